"""retention.py: the keep/delete decision as a pure function."""

import pytest

from ckptguard.catalog.retention import Candidate, RetentionPolicy, plan


def cands(*specs):
    return [Candidate(f"checkpoint-{s}", s, seq, {"loss": loss}) for seq, (s, loss) in enumerate(specs, start=1)]


def test_newest_is_kept_even_when_keep_last_would_not_cover_it_by_step():
    # sequence, not step, decides "newest": the step-50 save happened last (after a resume from 20)
    found = [Candidate("checkpoint-90", 90, 1, {}), Candidate("checkpoint-50", 50, 2, {})]
    keep = plan(found, RetentionPolicy(keep_last=1))
    assert keep == {"checkpoint-90": [], "checkpoint-50": ["newest", "last 1"]}


def test_best_in_max_mode_and_nan_metrics_never_count_as_best():
    found = cands((1, 0.2), (2, float("nan")), (3, 0.9), (4, 0.1))
    keep = plan(found, RetentionPolicy(keep_last=1, keep_best=1, metric="loss", mode="max"))
    assert keep["checkpoint-3"] == ["best loss"] and keep["checkpoint-2"] == []


def test_keep_all_when_keep_last_is_none():
    keep = plan(cands((1, 0), (2, 0)), RetentionPolicy())
    assert all(keep.values())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"keep_last": 0}, "keep_last must be >= 1"),
        ({"keep_best": 1}, "keep_best needs metric="),
        ({"mode": "avg"}, "mode must be 'min' or 'max'"),
        ({"keep_every": 0}, "keep_every must be >= 1"),
    ],
)
def test_bad_policy_names_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RetentionPolicy(**kwargs)


def test_slots_count_what_preflight_must_reserve():
    assert RetentionPolicy(keep_last=3, keep_best=1, metric="loss").slots == 4
    assert RetentionPolicy(keep_last=3, keep_every=100).slots is None


def test_a_protected_checkpoint_takes_a_place_of_the_newest_only_when_the_policy_says_so():
    # HF's rotation: save_total_limit=2 with the best at step 1 keeps the best and the newest, not three
    found = cands((1, 0.1), (2, 0.5), (3, 0.4), (4, 0.3))
    protected = frozenset({"checkpoint-1"})
    counted = plan(found, RetentionPolicy(keep_last=2, protected_counts=True), protected)
    assert [n for n, why in counted.items() if why] == ["checkpoint-1", "checkpoint-4"]
    on_top = plan(found, RetentionPolicy(keep_last=2), protected)
    assert [n for n, why in on_top.items() if why] == ["checkpoint-1", "checkpoint-3", "checkpoint-4"]
    # never fewer than the newest, however many are protected; a protected one among the newest costs nothing
    many = plan(found, RetentionPolicy(keep_last=2, protected_counts=True), frozenset({"checkpoint-1", "checkpoint-2"}))
    assert many["checkpoint-4"] == ["newest", "last 1"] and many["checkpoint-3"] == []
    inside = plan(found, RetentionPolicy(keep_last=2, protected_counts=True), frozenset({"checkpoint-3"}))
    assert [n for n, why in inside.items() if why] == ["checkpoint-3", "checkpoint-4"]
