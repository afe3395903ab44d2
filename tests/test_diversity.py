"""Diversity-aware metrics (fastgen.eval.diversity, probes): hand-computed cases, bad input, and rankings of
real-image sets whose defect is known by construction (fastgen.eval.probes)."""

import numpy as np
import pytest
import torch

from fastgen.eval.classifiers import real_images, real_images_of_classes
from fastgen.eval.diversity import (PIXEL_PCA_COMPONENTS, class_fd, fd_by_feature_group, pixel_fd_from_images,
                                    pixel_features, pixel_pca, prdc, prdc_from_images)
from fastgen.eval.evaluate import domain_scores
from fastgen.eval.probes import keep_fraction, probe_sets, proportional_labels


# --- precision / recall / density / coverage ------------------------------------------------------
def test_prdc_matches_a_hand_computed_case(capsys):
    # k = 1: every real point's ball has radius 1 (its nearest real neighbour). The fake at 0.5 lies in
    # the balls of reals 0 and 1; its own ball (radius 9.5, to the fake at 10) holds every real point.
    real = np.array([[0.0], [1.0], [2.0], [3.0]])
    fake = np.array([[0.5], [10.0], [10.2]])
    out = prdc(real, fake, k=1)
    assert out["precision"] == pytest.approx(1 / 3)  # only 0.5 lies in a real ball
    assert out["recall"] == pytest.approx(1.0)  # the outlier-sized ball of 0.5 covers all reals
    assert out["density"] == pytest.approx(2 / 3)  # (2 + 0 + 0) real balls / (k * 3 fakes)
    assert out["coverage"] == pytest.approx(0.5)  # reals 0 and 1 have a fake within radius 1
    assert capsys.readouterr().out == ""  # prdc's own print is silenced


def test_prdc_of_a_set_with_itself_and_of_a_far_set():
    feats = np.random.default_rng(0).standard_normal((200, 8))
    same = prdc(feats, feats + 1e-9)
    assert same["precision"] == same["recall"] == same["coverage"] == 1.0
    far = prdc(feats, feats + 100.0)
    assert far == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}


@pytest.mark.parametrize("real, fake, k, message", [
    (np.zeros((10, 3)), np.zeros((10, 4)), 5, "equal width, got real_feats 3 and fake_feats 4"),
    (np.zeros((5, 3)), np.zeros((10, 3)), 5, "real_feats: 5 feature vectors, more than k = 5 needed"),
    (np.zeros((10, 3)), np.zeros(10), 5, r"fake_feats must be a \[N, D\] feature array"),
    (np.zeros((10, 3)), np.zeros((10, 3)), 0, "k must be a positive integer, got 0"),
])
def test_prdc_bad_input_is_one_clear_line(real, fake, k, message):
    with pytest.raises(ValueError, match=message) as err:
        prdc(real, fake, k)
    assert len(str(err.value).splitlines()) == 1


def test_prdc_from_images_draws_equal_sizes():
    images = real_images("digits", "train", n=400)  # more than the 300 digits test images
    out = prdc_from_images(images, "digits-ddpm")
    assert out["n_prdc"] == 300 and out["recall"] > 0.9 and out["precision"] > 0.9
    with pytest.raises(ValueError, match="generated images: 5 image"):
        prdc_from_images(images[:5], "digits")


# --- per-class FD ---------------------------------------------------------------------------------
def test_class_fd_matches_a_hand_computed_case():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((60, 4))
    ref_labels = np.repeat([0, 1, 2], 20)
    # class 0 is the reference class itself (FD 0); class 1 is its reference moved by 0.5 in each of the 4
    # dimensions (FD = 4 * 0.5^2 = 1); class 2 moved by 1 (FD 4); the mean is 5 / 3
    feats = np.concatenate([ref[:20], ref[20:40] + 0.5, ref[40:] + 1.0])
    out = class_fd(feats, ref_labels, ref, ref_labels)
    assert out["fd_by_class"] == pytest.approx({0: 0.0, 1: 1.0, 2: 4.0}, abs=1e-6)
    assert out["fd_class"] == pytest.approx(5 / 3, abs=1e-6)
    # only the classes present in the generated labels count
    assert class_fd(feats[20:], ref_labels[20:], ref, ref_labels)["fd_class"] == pytest.approx(2.5, abs=1e-6)


@pytest.mark.parametrize("labels, ref_labels, message", [
    (np.repeat([0, 1], [10, 9]), np.repeat([0, 1], 20), r"labels must be 20 class indices .* got shape \[19\]"),
    (np.repeat([0, 1], [12, 8]), np.repeat([0, 1], 20), "labels: class 1 has 8 image"),
    (np.repeat([0, 1], 10), np.repeat([0, 2], 20), "ref_labels: class 1 has 0 image"),
    (np.repeat([0.0, 1.0], 10), np.repeat([0, 1], 20), "non-negative integer class indices, got dtype float64"),
])
def test_class_fd_bad_input_is_one_clear_line(labels, ref_labels, message):
    feats, ref = np.random.default_rng(1).standard_normal((20, 3)), np.random.default_rng(0).standard_normal((40, 3))
    with pytest.raises(ValueError, match=message) as err:
        class_fd(feats, labels, ref, ref_labels)
    assert len(str(err.value).splitlines()) == 1


def test_real_images_of_classes_keeps_the_order_of_the_labels():
    images, labels = real_images("digits", "train", with_labels=True)
    wanted = torch.tensor([3, 3, 0, 9, 3, 1])
    picked = real_images_of_classes("digits", wanted, "train", seed=5)
    # find every picked image in the split: it must be a distinct image of the wanted class
    matches = [torch.nonzero((images == img).flatten(1).all(1)).flatten() for img in picked]
    assert all(labels[m].eq(c).all() for m, c in zip(matches, wanted))
    assert len({int(m[0]) for m in matches}) == len(wanted)
    with pytest.raises(ValueError, match="labels ask for 5000 images of class 2"):
        real_images_of_classes("digits", torch.full((5000,), 2))


# --- pixel-PCA FD ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name, share", [("digits", (0.88, 0.90)), ("fmnist", (0.875, 0.885))])
def test_pixel_pca_components_hold_the_documented_share_of_the_variance(name, share):
    pca = pixel_pca(name)
    assert pca.n_components_ == PIXEL_PCA_COMPONENTS[name]
    assert share[0] < pca.explained_variance_ratio_.sum() < share[1]


def test_pixel_fd_is_zero_for_the_reference_and_grows_with_blur():
    test = real_images("digits", "test")
    assert pixel_features(test, "digits").shape == (300, 20)
    assert abs(pixel_fd_from_images(test, "digits")) < 1e-8
    train = real_images("digits", "train", n=300)
    real, blurred = pixel_fd_from_images(train, "digits"), pixel_fd_from_images(torch.nn.functional.avg_pool2d(
        train, 3, 1, 1, count_include_pad=False), "digits")
    assert blurred > 5 * real
    assert np.allclose(pixel_features(test.repeat(1, 3, 1, 1), "digits"), pixel_features(test, "digits"))
    with pytest.raises(ValueError, match="size 8x8, got 32x32"):
        pixel_fd_from_images(torch.rand(20, 1, 32, 32), "digits")


# --- per feature group --------------------------------------------------------------------------
def test_fd_by_feature_group_matches_a_hand_computed_case():
    ref = np.random.default_rng(0).standard_normal((100, 5))
    feats = ref.copy()
    feats[:, :2] += 1.0  # group "a" moved by 1 in its 2 columns: FD 2; group "b" unchanged: FD 0
    out = fd_by_feature_group(feats, ref, [("a", 2), ("b", 3)])
    assert out == pytest.approx({"a": 2.0, "b": 0.0}, abs=1e-6)
    with pytest.raises(ValueError, match="groups cover 4 columns; feats have 5"):
        fd_by_feature_group(feats, ref, [("a", 2), ("b", 2)])


# --- probes: sets of known quality, ranked ----------------------------------------------------------
def test_probe_builders():
    labels = torch.arange(40) % 4
    images = torch.arange(40.0)[:, None, None, None]
    kept = keep_fraction(images, labels, 0.2)  # 10 images per class, 2 kept
    assert kept.shape == images.shape and len(kept.unique()) == 8
    assert all(set(kept[labels == c].flatten().tolist()) == set(images[labels == c][:2].flatten().tolist())
               for c in range(4))
    counts = torch.bincount(proportional_labels(2000), minlength=10)  # 2000 * (c + 1) / 55, rounded to sum 2000
    assert counts.tolist() == [36, 73, 109, 145, 182, 218, 255, 291, 327, 364]
    with pytest.raises(ValueError, match="fraction must be in"):
        keep_fraction(images, labels, 0.0)


RANKED = ("fd", "fd_class", "fd_pixel", "precision", "recall", "density", "coverage")


@pytest.fixture(scope="module")
def probe_scores():
    """Every ranked metric of the fmnist probes: 2,000 real train images (200 per class) and their damaged copies."""
    return {probe: domain_scores(images, labels, "fmnist", RANKED)
            for probe, (images, labels) in probe_sets("fmnist", per_class=200).items()}


def test_lost_diversity_ranks_worse(probe_scores):
    full, ten, one = probe_scores["full"], probe_scores["keep 10%"], probe_scores["keep 1%"]
    # 1% of each class repeated: worse by recall, coverage, per-class FD and the headline FD
    assert one["recall"] < 0.5 * full["recall"] and one["coverage"] < 0.5 * full["coverage"]
    assert one["fd_class"] > 5 * full["fd_class"] and one["fd"] > 5 * full["fd"]
    # 10%: worse by recall and coverage; coverage still orders it above 1% (recall is 0 for both: every
    # image repeats at least k + 1 times, so each generated k-NN ball has radius 0)
    assert ten["recall"] < full["recall"] - 0.3 and one["coverage"] < ten["coverage"] < full["coverage"] - 0.3
    assert ten["fd"] > 2 * full["fd"] and ten["fd_class"] > 2 * full["fd_class"]
    # the class prototypes (what strong guidance draws): worse by every diversity measure, not by precision
    typical = probe_scores["most typical 20%"]
    assert typical["recall"] < full["recall"] - 0.3 and typical["coverage"] < full["coverage"] - 0.3
    assert typical["fd"] > 5 * full["fd"] and typical["fd_class"] > 5 * full["fd_class"]
    assert typical["precision"] > full["precision"] - 0.05


def test_blur_ranks_worse_by_precision_and_fd(probe_scores):
    full, blurred = probe_scores["full"], probe_scores["blurred"]
    assert blurred["precision"] < full["precision"] - 0.15
    assert blurred["fd"] > 10 * full["fd"]


def test_wrong_class_proportions_rank_worse_by_fd(probe_scores):
    full, skewed = probe_scores["full"], probe_scores["wrong proportions"]
    assert skewed["fd"] > 5 * full["fd"]


def test_fd_groups_from_images_on_real_images():
    from fastgen.eval.diversity import fd_groups_from_images
    from fastgen.eval.metrics import fd_kid_from_images

    test = real_images("digits", "test")
    same = fd_groups_from_images(test, "digits")
    assert list(same) == ["block1_mean", "block1_std", "block2_mean", "block2_std", "penultimate", "all"]
    assert all(abs(v) < 1e-4 for v in same.values()), same
    train = real_images("digits", "train", n=300)
    groups = fd_groups_from_images(train, "digits")
    fd = fd_kid_from_images(train, "digits", compute_kid=False)["fd"]
    assert groups["penultimate"] == pytest.approx(fd, rel=1e-4)
    assert groups["all"] > max(v for k, v in groups.items() if k != "all")
