"""fastgen compare: runs' training-time evaluations side by side."""

import json

import pytest

from fastgen.cli import main
from fastgen.eval.compare import compare_runs, minutes_to


def run_folder(root, name, method, fds, recalls, seconds_per_eval=60.0, resumed_repeat=False):
    folder = root / name
    folder.mkdir()
    (folder / "recipe.json").write_text(json.dumps({"method": method, "train": {"batch_size": 64}}))
    records = [{"step": 500 * (i + 1), "train_s": seconds_per_eval * (i + 1), "fd": fd, "recall": rc, "acc": 0.9}
               for i, (fd, rc) in enumerate(zip(fds, recalls))]
    if resumed_repeat:  # a resumed run evaluates again after its checkpoint: the later record of a step wins
        records.insert(2, {**records[1], "fd": 99.0})
    (folder / "eval.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return folder


def test_compare_table_minutes_to_the_bar_and_plot(tmp_path):
    a = run_folder(tmp_path, "dmd2", "dmd2", [9.0, 6.0, 4.5], [0.5, 0.6, 0.65])
    b = run_folder(tmp_path, "sid", "sid", [7.0, 4.9, 4.2], [0.55, 0.62, 0.7], seconds_per_eval=120.0,
                   resumed_repeat=True)
    result = compare_runs([a, b], tmp_path / "out", teacher_fd=4.0, labels=["DMD2", "SiD"])
    # FD <= 5.0 first at 180 s (DMD2) and at 360 s (SiD: its step 1000 was evaluated again after a resume, FD 99)
    assert [r["minutes_to_bar"] for r in result["runs"]] == [3.0, 6.0]
    assert [r["step"] for r in result["runs"][1]["records"]] == [500, 1000, 1500]
    assert result["runs"][1]["records"][1]["fd"] == 99.0  # the later record of step 1000 is kept
    table = (tmp_path / "out" / "compare.md").read_text()
    assert "| DMD2 | dmd2 | 64 | 1500 | 3.0 | 4.50 |" in table and "| SiD | sid |" in table
    assert (tmp_path / "out" / "compare.png").stat().st_size > 10_000
    assert minutes_to(result["runs"][0]["records"], "fd", 1.0) is None


@pytest.mark.parametrize("args, message", [
    (["compare", "{tmp}/missing"], "has no eval.jsonl"),
    (["compare", "{tmp}/old"], "no records with training time"),
    (["compare", "{tmp}/ok", "--labels", "a,b"], "2 labels for 1 runs"),
    (["compare", "{tmp}/ok", "--teacher-fd", "0"], "--teacher-fd must be > 0"),
    (["compare", "{tmp}/ok", "--out", "{tmp}/file.txt"], "is a file, not a folder"),
])
def test_compare_bad_input_is_one_line(tmp_path, capsys, args, message):
    run_folder(tmp_path, "ok", "sid", [5.0], [0.5])
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "eval.jsonl").write_text(json.dumps({"step": 500, "fd": 3.0}) + "\n")
    (tmp_path / "file.txt").write_text("keep me")
    assert main([a.format(tmp=tmp_path) for a in args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert (tmp_path / "file.txt").read_text() == "keep me"
