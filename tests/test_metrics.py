"""Metric layer of the evaluation harness (fastgen.eval.metrics / classifiers): known answers, offline."""

import json

import numpy as np
import pytest
import torch

from fastgen.eval import classifiers, metrics
from fastgen.eval.classifiers import DomainClassifier, load_classifier, load_reference_stats, real_images
from fastgen.eval.metrics import (MIN_IMAGES_FD, blur, clean_fid, clean_fid_stats, clip_score, fd_from_feats,
                                  fd_kid_from_images, fd_via_cleanfid, feature_stats, frechet_distance, kid,
                                  load_clip, load_image_folder, prompt_accuracy, save_image_folder)


def gaussian(n, dim, shift=0.0, seed=0):
    """``n`` samples of one fixed correlated Gaussian in ``dim`` dimensions, its mean moved by ``shift``."""
    cov_root = np.eye(dim) + 0.3 * np.random.default_rng(1234).standard_normal((dim, dim)) / np.sqrt(dim)
    return np.random.default_rng(seed).standard_normal((n, dim)) @ cov_root + shift


# --- Fréchet distance and KID on features ---------------------------------------------------------
def test_fd_of_a_set_with_itself_is_zero():
    feats = gaussian(500, 16)
    assert abs(fd_from_feats(feats, feats)) < 1e-6


def test_fd_grows_monotonically_with_shift():
    base = gaussian(2000, 8, seed=1)
    fds = [fd_from_feats(base, gaussian(2000, 8, shift=s, seed=2)) for s in (0.0, 0.25, 0.5, 1.0, 2.0)]
    assert all(a < b for a, b in zip(fds, fds[1:])), fds
    # the mean term dominates: |shift|^2 * dim = 4 * 8 for the largest shift
    assert fds[-1] == pytest.approx(32, rel=0.1)


def test_fd_equals_cleanfid():
    a, b = gaussian(400, 24, seed=3), gaussian(300, 24, shift=0.3, seed=4) ** 2
    ours, theirs = fd_from_feats(a, b), fd_via_cleanfid(a, b)
    assert ours == pytest.approx(theirs, rel=1e-6)
    mu, sigma = feature_stats(a)
    assert frechet_distance(mu, sigma, *feature_stats(b)) == pytest.approx(theirs, rel=1e-6)


def test_fd_equals_cleanfid_on_classifier_features():
    real = metrics.classifier_features(real_images("digits", "test"), "digits")
    fake = metrics.classifier_features(blur(real_images("digits", "train", n=300), 3), "digits")
    assert fd_from_feats(fake, real) == pytest.approx(fd_via_cleanfid(fake, real), rel=1e-6)


def test_kid_near_zero_for_one_distribution_and_larger_when_shifted():
    a, b = gaussian(600, 16, seed=5), gaussian(600, 16, seed=6)
    same = kid(a, b, num_subsets=20, max_subset_size=300)
    shifted = kid(a, gaussian(600, 16, shift=0.5, seed=7), num_subsets=20, max_subset_size=300)
    assert abs(same) < 0.05
    assert shifted > 0.2 and shifted > 10 * abs(same)
    # deterministic for a fixed seed, without disturbing numpy's global generator
    state = np.random.get_state()[1].copy()
    assert kid(a, b, num_subsets=5, seed=1) == kid(a, b, num_subsets=5, seed=1)
    assert (np.random.get_state()[1] == state).all()


# --- domain classifiers ---------------------------------------------------------------------------
def test_digits_classifier_accuracy():
    images, labels = real_images("digits", "test", with_labels=True)
    assert images.shape[1:] == (1, 8, 8) and 0 <= images.min() and images.max() <= 1
    assert prompt_accuracy(images, labels, "digits-ddpm") > 0.95


def test_fmnist_classifier_accuracy():
    images, labels = real_images("fmnist", "test", n=2000, with_labels=True)
    assert images.shape[1:] == (1, 32, 32)
    assert prompt_accuracy(images, labels, "fmnist") > 0.85


@pytest.mark.parametrize("name, n", [("digits", 300), ("fmnist", 10000)])
def test_shipped_reference_stats_match_the_weights(name, n):
    mu, sigma, n_ref = load_reference_stats(name)
    feats = metrics.reference_features(name, "test")
    assert n_ref == len(feats) == n
    mu2, sigma2 = feature_stats(feats)
    assert np.allclose(mu, mu2, atol=1e-4) and np.allclose(sigma, sigma2, atol=1e-4)
    config = json.loads((classifiers.classifier_dir(name) / "config.json").read_text())
    assert len(mu) == config["feature_dim"] == load_classifier(name).feature_dim
    assert config["fd_groups"] == list(classifiers.FD_GROUPS)


def test_fd_features_are_the_fd_groups_of_all_features():
    model = load_classifier("digits")
    images = real_images("digits", "test")[:50]
    everything, fd_feats = model.all_features(images), model.features(images)
    assert everything.shape == (50, model.all_feature_dim) and fd_feats.shape == (50, model.feature_dim)
    assert classifiers.FD_GROUPS == ("penultimate",) and model.feature_dim == model.config.hidden
    start = sum(width for name, width in model.feature_groups() if name != "penultimate")  # penultimate comes last
    assert torch.equal(fd_feats, everything[:, start:])
    # calibrated on the train split: every group has mean ~0 and mean variance ~1 there
    train = model.all_features(real_images("digits", "train")).detach().double()
    begin = 0
    for _, width in model.feature_groups():
        group = train[:, begin:begin + width]
        assert group.mean(0).abs().max() < 1e-3 and group.var(0).mean() == pytest.approx(1, rel=1e-3)
        begin += width


# a 5x5 blur of 8x8 digits silences some edge channels on every image: singular covariance, expected
@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")
@pytest.mark.parametrize("name, n", [("digits", 300), ("fmnist", 1000)])
def test_blur_increases_fd_on_real_images(name, n):
    train = real_images(name, "train", n=n)
    fd = {k: fd_kid_from_images(images, name, compute_kid=False)["fd"]
          for k, images in {"real": train, "blur3": blur(train, 3), "blur5": blur(train, 5)}.items()}
    assert fd["blur3"] > 3 * fd["real"], fd
    assert fd["blur5"] > fd["blur3"], fd


def test_fd_kid_from_images_reports_counts_and_kid():
    images = real_images("digits", "train", n=300)
    real = fd_kid_from_images(images, "digits", kid_subsets=20)
    blurred = fd_kid_from_images(blur(images, 3), "digits", kid_subsets=20)
    assert real["n"] == 300 and real["n_ref"] == 300
    assert blurred["kid"] > real["kid"] and abs(real["kid"]) < blurred["kid"] / 5
    custom = fd_kid_from_images(images, load_classifier("digits"), reference=real_images("digits", "test"),
                                compute_kid=False)
    assert custom["fd"] == pytest.approx(real["fd"], rel=1e-4)


def test_classifier_input_checks():
    model = load_classifier("digits")
    grey = torch.rand(4, 1, 8, 8)
    assert torch.allclose(model(grey.repeat(1, 3, 1, 1)), model(grey), atol=1e-5)
    with pytest.raises(ValueError, match="2 channels"):
        model(torch.rand(4, 2, 8, 8))
    with pytest.raises(ValueError, match="spatial size 32x32"):
        model.features(torch.rand(4, 1, 32, 32))
    with pytest.raises(KeyError, match="digits"):
        load_classifier("cifar")


def test_missing_classifier_names_the_command(monkeypatch, tmp_path):
    monkeypatch.setattr(classifiers, "CLASSIFIER_DIR", tmp_path)
    with pytest.raises(FileNotFoundError, match="python -m fastgen.eval.classifiers digits"):
        load_classifier("digits")
    with pytest.raises(FileNotFoundError, match="reference_stats.npz"):
        load_reference_stats("digits-ddpm")


def test_train_classifier_writes_a_loadable_folder(tmp_path):
    folder = classifiers.train_classifier("digits", tmp_path / "digits", epochs=1, progress=False)
    assert {p.name for p in folder.iterdir()} == {"model.safetensors", "config.json", "reference_stats.npz",
                                                    "README.md"}
    config = json.loads((folder / "config.json").read_text())
    assert config["seed"] == 0 and config["epochs"] == 1 and "--epochs 1" in config["command"]
    model = DomainClassifier(config["architecture"])
    from safetensors.torch import load_file

    model.load_state_dict(load_file(folder / "model.safetensors"))
    assert model.eval().features(torch.rand(3, 1, 8, 8)).shape == (3, model.feature_dim)


# --- input validation -----------------------------------------------------------------------------
def test_image_folder_round_trip_and_errors(tmp_path):
    images = torch.rand(12, 1, 8, 8)
    save_image_folder(images, tmp_path / "ok")
    loaded = load_image_folder(tmp_path / "ok", expected_size=8, expected_channels=1, min_images=MIN_IMAGES_FD)
    assert loaded.shape == (12, 1, 8, 8) and (loaded - images).abs().max() <= 0.5 / 255 + 1e-6

    with pytest.raises(ValueError, match="does not exist"):
        load_image_folder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match="no images"):
        load_image_folder(tmp_path / "empty")
    with pytest.raises(ValueError, match="size 32x32, got 8x8"):
        load_image_folder(tmp_path / "ok", expected_size=32)
    with pytest.raises(ValueError, match="3 channel"):
        load_image_folder(tmp_path / "ok", expected_channels=3)
    save_image_folder(torch.rand(3, 3, 8, 8), tmp_path / "few")
    with pytest.raises(ValueError, match=f"at least {MIN_IMAGES_FD} needed"):
        load_image_folder(tmp_path / "few", min_images=MIN_IMAGES_FD)
    save_image_folder(torch.rand(2, 1, 16, 16), tmp_path / "ok", prefix="z")
    with pytest.raises(ValueError, match="all images of a folder must match"):
        load_image_folder(tmp_path / "ok")


def test_metric_input_errors():
    with pytest.raises(ValueError, match=f"at least {MIN_IMAGES_FD} needed"):
        fd_kid_from_images(torch.rand(5, 1, 8, 8), "digits")
    with pytest.raises(ValueError, match="size 8x8, got 32x32"):
        fd_kid_from_images(torch.rand(20, 1, 32, 32), "digits")
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        fd_kid_from_images(torch.rand(20, 1, 8, 8) * 2 - 1, "digits")
    with pytest.raises(ValueError, match="labels"):
        prompt_accuracy(torch.rand(4, 1, 8, 8), [0, 1], "digits")
    with pytest.raises(ValueError, match="matching shapes"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="kind must be one of box, gaussian, not 'median'"):
        blur(torch.rand(2, 1, 8, 8), 3, kind="median")


# --- clean-fid ------------------------------------------------------------------------------------
def test_clean_fid_missing_inception_weights_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(metrics, "inception_weights_path", lambda: tmp_path / metrics.INCEPTION_FILE)
    save_image_folder(torch.rand(10, 3, 16, 16), tmp_path / "ref")
    with pytest.raises(FileNotFoundError, match="inception-2015-12-05.pt") as err:
        clean_fid(torch.rand(10, 3, 16, 16), tmp_path / "ref")
    assert str(tmp_path) in str(err.value)


def test_clean_fid_reference_errors(tmp_path):
    images = torch.rand(10, 3, 16, 16)
    with pytest.raises(ValueError, match="does not exist"):
        clean_fid(images, tmp_path / "missing" / "stats.npz")
    with pytest.raises(ValueError, match="dataset_res"):
        clean_fid(images, "cifar10")
    with pytest.raises(FileNotFoundError, match="made_up_clean_train_32.npz"):
        clean_fid(images, "made_up", dataset_res=32, dataset_split="train")
    with pytest.raises(ValueError, match=f"at least {MIN_IMAGES_FD} needed"):
        clean_fid(torch.rand(3, 3, 16, 16), tmp_path)


def test_clean_fid_plumbing_with_a_custom_extractor(tmp_path):
    # clean-fid's custom_feat_extractor path, so no Inception weights are needed: mean colour on a 4x4 grid
    def extractor(x):
        return torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)

    real, fake = torch.rand(24, 1, 16, 16), torch.rand(24, 1, 16, 16) * 0.5
    save_image_folder(real, tmp_path / "real")
    same = clean_fid(real, tmp_path / "real", custom_feat_extractor=extractor, device="cpu")
    assert abs(same) < 1e-3
    far = clean_fid(fake, tmp_path / "real", custom_feat_extractor=extractor, device="cpu")
    stats = clean_fid_stats(tmp_path / "real", tmp_path / "real.npz", custom_feat_extractor=extractor, device="cpu")
    assert far > 100
    assert clean_fid(fake, stats, custom_feat_extractor=extractor, device="cpu") == pytest.approx(far, rel=1e-6)
    assert clean_fid(fake, real, custom_feat_extractor=extractor, device="cpu") == pytest.approx(far, rel=1e-6)


# --- CLIP score -----------------------------------------------------------------------------------
TINY_CLIP = {"embed_dim": 16,
             "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
             "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    import open_clip

    path = tmp_path_factory.mktemp("clip") / "fastgen-tiny-clip.json"
    path.write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(path)
    return "fastgen-tiny-clip"


def test_clip_score_with_a_tiny_untrained_model(tiny_clip):
    torch.manual_seed(0)
    model, preprocess, tokenizer = load_clip(tiny_clip, None, device="cpu")
    images = torch.rand(4, 1, 32, 32)
    prompts = ["a photo of a sneaker", "a photo of a bag", "a photo of a coat", "a photo of a dress"]
    score = clip_score(images, prompts, model=model, preprocess=preprocess, tokenizer=tokenizer, batch_size=3)
    assert np.isfinite(score) and 0 <= score <= 100
    with pytest.raises(ValueError, match="4 images but 3 prompts"):
        clip_score(images, prompts[:3], model=model, preprocess=preprocess, tokenizer=tokenizer)


def test_clip_unknown_names():
    with pytest.raises(ValueError, match="Unknown open_clip model"):
        load_clip("no-such-clip", None)
    with pytest.raises(ValueError, match="no pretrained tag 'laion-made-up'"):
        load_clip("ViT-B-32", "laion-made-up")


def test_clip_pretrained_weights_offline_is_a_clear_error():
    from huggingface_hub import constants, try_to_load_from_cache

    if not constants.HF_HUB_OFFLINE:
        pytest.skip("needs HF_HUB_OFFLINE=1 when huggingface_hub is imported (online, open_clip would download)")
    if isinstance(try_to_load_from_cache("timm/vit_base_patch32_clip_224.openai", "open_clip_pytorch_model.bin"), str):
        pytest.skip("the ViT-B-32 openai weights are cached on this machine")
    with pytest.raises(RuntimeError, match="'ViT-B-32' with pretrained='openai' are not available"):
        load_clip("ViT-B-32", "openai", device="cpu")
