"""The one save order (catalog/checkpoint.py): newest is the highest save sequence among valid checkpoints."""

from __future__ import annotations

from ckptguard.catalog.checkpoint import Checkpoint, newest_first, save_order


def _c(name: str, step: int, sequence: int, valid: bool = True) -> Checkpoint:
    return Checkpoint(name=name, step=step, valid=valid, sequence=sequence)


def test_a_later_save_of_an_earlier_step_is_newer_than_a_leftover_higher_step() -> None:
    """After an explicit resume from step 100, the abandoned timeline's step 300 must not win."""
    found = [_c("checkpoint-300", 300, 3), _c("checkpoint-200", 200, 5), _c("checkpoint-100", 100, 1)]
    assert [c.name for c in newest_first(found)] == ["checkpoint-200", "checkpoint-300", "checkpoint-100"]


def test_invalid_checkpoints_are_never_in_the_order() -> None:
    found = [_c("checkpoint-9", 9, 9, valid=False), _c("checkpoint-1", 1, 1)]
    assert [c.name for c in newest_first(found)] == ["checkpoint-1"]


def test_the_step_breaks_a_tie_of_sequences() -> None:
    """Saves written before sequences were unique (an exported adapter has sequence 0) still order by step."""
    found = [_c("a", 1, 0), _c("b", 2, 0)]
    assert [c.name for c in newest_first(found)] == ["b", "a"]
    assert save_order(found[1]) == (0, 2)
