"""``student.init``: a run whose student starts from an earlier run's exported student instead of the teacher.

SiD's best results (SiD²A: SiDA fine-tuning from a trained SiD student) and DMD2's multi-stage recipes start the
generator from a trained student. :func:`load_student_init` reads such a folder's network (the component the
teacher's pipeline distils: ``unet`` or ``transformer``) with the schedule it was exported with; the method copies
its weights into its student (:func:`fastgen.methods.base.start_student_from`, which checks class, config and
parameterisation). The critic still starts from the teacher, as SiD and DMD2 do.

The run records the folder's weights like the teacher's: ``teacher.json`` holds ``student_init`` (the folder as
given and :func:`~fastgen.pipelines.loading.module_digest` of its network), and ``--resume`` refuses a folder whose
weights changed (:func:`check_resumed_init`). A resumed run takes its student from the checkpoint, never from
the folder again.
"""

from __future__ import annotations

import json
from pathlib import Path

from fastgen.denoiser import Denoiser
from fastgen.pipelines.generate import network_component, network_denoiser
from fastgen.pipelines.loading import first_line, module_digest

from .runfolder import TEACHER_FILE, read_json

WHAT = "student.init"
STUDENT_DIR = "student"  # where a run folder holds its exported student


def init_folder(path: str) -> Path:
    """The exported student folder ``path`` names: the folder itself when it holds ``model_index.json``, else a
    run folder's ``student/``; a one-line ``FileNotFoundError`` otherwise (checked before the teacher loads)."""
    folder = Path(path)
    if (folder / "model_index.json").is_file():
        return folder
    if (folder / STUDENT_DIR / "model_index.json").is_file():
        return folder / STUDENT_DIR
    what = "does not exist" if not folder.exists() else "is neither a pipeline folder (model_index.json) nor a run "\
        "folder holding student/"
    raise FileNotFoundError(f"{WHAT} = {path!r} {what}: give an exported student folder (a run's student/) or "
                            "its run folder.")


def load_student_init(path: str, pipe) -> Denoiser:
    """The trained student in ``path`` (see :func:`init_folder`) as a :class:`Denoiser`: its network (the component
    the teacher ``pipe`` distils, safetensors weights only) with the schedule of its exported scheduler, at the
    teacher's training size."""
    import diffusers

    folder = init_folder(path)
    name = network_component(pipe)
    entry = json.loads((folder / "model_index.json").read_text()).get(name)
    if not (isinstance(entry, list) and len(entry) == 2 and entry[1]):
        raise ValueError(f"{WHAT} = {path!r}: {folder} has no {name} (the network the teacher "
                         f"{type(pipe).__name__} distils).")
    library, class_name = entry
    cls = getattr(diffusers, class_name, None) if library == "diffusers" else None
    if cls is None:
        raise ValueError(f"{WHAT} = {path!r}: its {name} is a {library}.{class_name}, not a diffusers network.")
    try:
        network = cls.from_pretrained(str(folder), subfolder=name, use_safetensors=True)
        scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    except (OSError, ValueError) as err:
        raise FileNotFoundError(f"{WHAT} = {path!r}: could not load its {name} and scheduler: "
                                f"{first_line(err)}") from None
    network.requires_grad_(False).eval()
    return network_denoiser(network, scheduler, getattr(pipe, "default_sample_size", None))


def init_record(path: str, init: Denoiser) -> dict:
    """What ``teacher.json`` keeps of the init: the folder as given and the digest of its network's weights."""
    return {"folder": path, "network": module_digest(init.model)}


def check_resumed_init(out_dir: Path, record: dict | None, what: str = "--resume") -> None:
    """Refuse a ``--resume`` whose ``student.init`` folder no longer holds the weights the run started from
    (``record``: :func:`init_record` of the folder now, ``None`` without ``student.init``)."""
    saved = (read_json(out_dir / TEACHER_FILE) or {}).get("student_init")
    if record is None or saved is None or saved.get("network") == record["network"]:
        return
    raise ValueError(f"{what}: {WHAT} = {record['folder']!r} no longer holds the weights the run started from "
                     "(its network changed since). Put the run's init student back, or start a new run in another "
                     "--out.")


__all__ = ["init_folder", "load_student_init", "init_record", "check_resumed_init"]
