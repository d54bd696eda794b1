"""Which copy a sharded (FSDP2) run restores from after a loss (shard_plan.plan_restore)."""

from __future__ import annotations

import pytest
import torch

from fm9g.model.shard_plan import Held, Holdings, Layout, NoShardCopy, buddy_of, chunk_rows, plan_restore, ward_of

L2 = Layout(gen=0, world=2)


def holds(*shards: tuple[Layout, int, int, str], full_step: int | None = None) -> Holdings:
    return Holdings(tuple(Held(layout, rank, step, kind) for layout, rank, step, kind in shards), full_step)


@pytest.mark.parametrize("rows,world", [(7, 2), (3, 2), (1, 4), (10, 3), (0, 2), (5, 8)])
def test_chunk_rows_cuts_like_torch_chunk(rows: int, world: int) -> None:
    """FSDP2 shards dim 0 as torch.chunk does; the rows must line up or a restore mixes shards."""
    pieces = torch.chunk(torch.arange(rows), world) if rows else ()
    expected = [piece.tolist() for piece in pieces] + [[]] * (world - len(pieces))
    got = [list(range(*chunk_rows(rows, world, rank))) for rank in range(world)]
    assert got == expected


def test_the_buddy_is_one_node_on_and_ward_is_its_inverse() -> None:
    assert [buddy_of(r, 8, 4) for r in range(8)] == [4, 5, 6, 7, 0, 1, 2, 3]
    assert all(ward_of(buddy_of(r, 6, 2) or 0, 6, 2) == r for r in range(6))
    assert [buddy_of(r, 3, 1) for r in range(3)] == [1, 2, 0]
    assert buddy_of(0, 1, 1) is None and ward_of(0, 1, 4) is None
    assert buddy_of(0, 2, 2) == 1, "fewer ranks than a node's: the next rank"


def test_a_lost_rank_comes_from_its_buddys_copy_at_the_live_step() -> None:
    # Rank 1 is lost; rank 0 lives at step 8 and keeps rank 1's copy of step 8.
    survivor = holds((L2, 0, 8, "live"), (L2, 0, 8, "own"), (L2, 1, 8, "ward"))
    replacement = holds()
    plan = plan_restore([survivor, replacement])
    assert (plan.step, plan.layout) == (8, L2)
    assert plan.writers == {0: (0, "live"), 1: (0, "ward")}
    assert plan.small_source == 0


def test_a_copy_cut_short_rolls_back_to_the_previous_snapshot() -> None:
    # The step-8 transfer never reached rank 0, so rank 1's newest copy is step 7.
    survivor = holds((L2, 0, 8, "live"), (L2, 0, 8, "own"), (L2, 0, 7, "own"), (L2, 1, 7, "ward"))
    plan = plan_restore([survivor, holds()])
    assert plan.step == 7
    assert plan.writers == {0: (0, "own"), 1: (0, "ward")}


def test_every_member_holding_the_whole_state_moves_nothing() -> None:
    plan = plan_restore([holds(full_step=10), holds(full_step=10)])
    assert plan.everyone_full and plan.step == 10


def test_live_shards_newer_than_a_whole_copy_win() -> None:
    """A rank restarted from the disk checkpoint (whole at 10) joins survivors at step 14."""
    a = holds((L2, 0, 14, "live"))
    b = holds((L2, 1, 14, "live"))
    plan = plan_restore([a, b, holds(full_step=10)])
    assert plan.step == 14 and plan.full_source is None


def test_a_rank_and_its_buddy_both_lost_is_no_copy() -> None:
    world4 = Layout(3, 4)
    # Ranks 0 and 1 survive; 2 and 3 are gone; rank 3's copy was on rank 1 but rank 2's on rank 3.
    a = holds((world4, 0, 5, "live"), (world4, 3, 5, "ward"))
    b = holds((world4, 1, 5, "live"), (world4, 0, 5, "ward"))
    with pytest.raises(NoShardCopy, match=r"rank\(s\) \[2\]"):
        plan_restore([a, b])


def test_holdings_survive_their_json_round_trip() -> None:
    original = holds((L2, 0, 8, "live"), (Layout(4, 3), 2, 6, "ward"), full_step=3)
    assert Holdings.from_json(original.to_json()) == original
