"""Blocked full-sort top-k against a dense brute force; ranking metrics against plain Python."""

import math

import pytest
import torch

from guider_fast.train.evaluate import full_sort_topk, ranking_metrics


def _data(gen, n_users=23, n_items=97, d=5, n_exclude=300, dtype=torch.float64):
    ue = torch.randn(n_users, d, generator=gen, dtype=torch.float64).to(dtype)
    ie = torch.randn(n_items, d, generator=gen, dtype=torch.float64).to(dtype)
    ex = torch.stack([torch.randint(0, n_users, (n_exclude,), generator=gen),
                      torch.randint(0, n_items, (n_exclude,), generator=gen)], 1)
    # User 0 has every item excluded; user 1 all but 3 (fewer than k for k > 3).
    all_items = torch.arange(n_items)
    ex = torch.cat([ex, torch.stack([torch.zeros_like(all_items), all_items], 1),
                    torch.stack([torch.ones(n_items - 3, dtype=torch.long), all_items[3:]], 1)])
    return ue, ie, ex


def _brute_topk(ue, ie, users, exclude, k):
    """Dense scores, masked, sorted by (score desc, id asc); -1 where nothing is left."""
    scores = ue.double()[users] @ ie.double().T
    if exclude is not None:
        for u_row, user in enumerate(users.tolist()):
            items = exclude[exclude[:, 0] == user, 1]
            scores[u_row, items] = -math.inf
    out = torch.full((len(users), k), -1, dtype=torch.long)
    for r in range(len(users)):
        ranked = sorted(range(ie.shape[0]), key=lambda j: (-scores[r, j].item(), j))
        ranked = [j for j in ranked if scores[r, j] > -math.inf][:k]
        out[r, :len(ranked)] = torch.tensor(ranked, dtype=torch.long)
    return out


@pytest.mark.parametrize("blocks", [(1, 1), (3, 7), (4, 96), (5, 200), (1024, 65536)])
@pytest.mark.parametrize("k", [1, 5, 30])
def test_topk_equals_brute_force(gen, blocks, k):
    ue, ie, ex = _data(gen)
    users = torch.tensor([5, 0, 1, 7, 7, 22, 3, 1, 9, 14, 2])  # arbitrary order, duplicates
    got = full_sort_topk(ue, ie, users, ex, k, user_block=blocks[0], item_block=blocks[1])
    assert got.dtype == torch.int64 and got.shape == (len(users), k)
    torch.testing.assert_close(got, _brute_topk(ue, ie, users, ex, k), rtol=0, atol=0)
    assert (got[1] == -1).all()  # user 0: everything excluded
    assert set(got[2].tolist()) <= {-1, 0, 1, 2}  # user 1: only items 0-2 may be left


def test_topk_no_exclude_float32_and_k_above_catalogue(gen):
    ue, ie, _ = _data(gen, dtype=torch.float32)
    users = torch.arange(ue.shape[0])
    got = full_sort_topk(ue, ie, users, None, 10, user_block=4, item_block=16)
    torch.testing.assert_close(got, _brute_topk(ue, ie, users, None, 10), rtol=0, atol=0)
    got = full_sort_topk(ue[:3], ie[:6], torch.tensor([0, 2]), None, 9, item_block=4)
    assert (got[:, 6:] == -1).all() and sorted(got[0, :6].tolist()) == list(range(6))
    empty = full_sort_topk(ue, ie, torch.tensor([], dtype=torch.long), None, 4)
    assert empty.shape == (0, 4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_topk_half_inputs_score_in_float32(gen, dtype):
    ue, ie, ex = _data(gen, dtype=dtype)
    users = torch.arange(2, 12)
    got = full_sort_topk(ue, ie, users, ex, 7, item_block=40)
    # bf16/fp16 products are exact in float32 for d = 5 up to float32 rounding; compare
    # against float64 on the rounded inputs where the scores are well separated.
    torch.testing.assert_close(got, _brute_topk(ue.float(), ie.float(), users, ex, 7), rtol=0, atol=0)


def test_ties_prefer_lower_item_ids():
    # Integer embeddings: many exactly equal scores, ties across block and k boundaries.
    gen = torch.Generator().manual_seed(3)
    ue = torch.randint(-2, 3, (6, 3), generator=gen).double()
    ie = torch.randint(-1, 2, (40, 3), generator=gen).double()
    users = torch.arange(6)
    ex = torch.tensor([[0, 1], [0, 5], [3, 0], [3, 2], [3, 4]])
    for blocks in ((1, 1), (2, 3), (6, 7), (6, 40)):
        for k in (1, 4, 9, 40):
            got = full_sort_topk(ue, ie, users, ex, k, user_block=blocks[0], item_block=blocks[1])
            torch.testing.assert_close(got, _brute_topk(ue, ie, users, ex, k), rtol=0, atol=0)


def _python_metrics(ue, ie, eval_pairs, exclude, ks):
    """MMRec definitions computed with plain Python loops."""
    eval_sets = {}
    for u, i in eval_pairs.tolist():
        eval_sets.setdefault(u, set()).add(i)
    ex_sets = {}
    for u, i in (exclude.tolist() if exclude is not None else []):
        ex_sets.setdefault(u, set()).add(i)
    scores = (ue.double() @ ie.double().T).tolist()
    sums = {f"{m}@{k}": 0.0 for k in ks for m in ("recall", "ndcg")}
    for u, relevant in eval_sets.items():
        ranked = sorted((j for j in range(ie.shape[0]) if j not in ex_sets.get(u, ())),
                        key=lambda j: (-scores[u][j], j))
        for k in ks:
            hits = [1 if j in relevant else 0 for j in ranked[:k]]
            sums[f"recall@{k}"] += sum(hits) / len(relevant)
            dcg = sum(h / math.log2(r + 2) for r, h in enumerate(hits))
            idcg = sum(1 / math.log2(r + 2) for r in range(min(len(relevant), k)))
            sums[f"ndcg@{k}"] += dcg / idcg
    return {key: v / len(eval_sets) for key, v in sums.items()}


def _eval_pairs(gen, n_users, n_items, n=120):
    users = torch.randint(3, n_users - 4, (n,), generator=gen)  # some users have no eval item
    items = torch.randint(0, n_items, (n,), generator=gen)
    pairs = torch.stack([users, items], 1)
    return torch.cat([pairs, pairs[:10], torch.tensor([[0, 4], [1, 0], [1, 50]])])  # duplicates


@pytest.mark.parametrize("blocks", [(1, 1), (4, 9), (1024, 65536)])
def test_metrics_equal_python(gen, blocks):
    ue, ie, ex = _data(gen)
    ev = _eval_pairs(gen, ue.shape[0], ie.shape[0])
    ks = (1, 3, 10, 20)
    got = ranking_metrics(ue, ie, ev, ex, ks, user_block=blocks[0], item_block=blocks[1])
    want = _python_metrics(ue, ie, ev, ex, ks)
    assert list(got) == ["recall@1", "ndcg@1", "recall@3", "ndcg@3", "recall@10", "ndcg@10",
                         "recall@20", "ndcg@20"]
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-12, abs=1e-12), key
        assert isinstance(got[key], float)
    assert got["recall@20"] >= got["recall@10"] >= got["recall@3"]
    # Without exclusions too.
    got = ranking_metrics(ue, ie, ev, None, (5,))
    want = _python_metrics(ue, ie, ev, None, (5,))
    assert got == pytest.approx(want, rel=1e-12)


def test_users_without_eval_items_are_skipped(gen):
    ue, ie, ex = _data(gen)
    ev = torch.tensor([[4, 10], [4, 11], [6, 3]])
    base = ranking_metrics(ue, ie, ev, ex, (5, 50))
    # More users in the tables (none of them evaluated) change nothing.
    more = ranking_metrics(torch.cat([ue, ue]), ie, ev, ex, (5, 50))
    assert base == more
    # The perfect case: each user's eval items are exactly its top items.
    top = full_sort_topk(ue, ie, torch.tensor([4, 6]), ex, 2)
    ev = torch.tensor([[4, top[0, 0]], [4, top[0, 1]], [6, top[1, 0]]])
    m = ranking_metrics(ue, ie, ev, ex, (1, 2))
    assert m["recall@2"] == 1.0 and m["ndcg@2"] == pytest.approx(1.0)
    assert m["recall@1"] == pytest.approx((0.5 + 1.0) / 2) and m["ndcg@1"] == pytest.approx(1.0)


def test_fully_excluded_user_counts_as_zero(gen):
    ue, ie, ex = _data(gen)
    m = ranking_metrics(ue, ie, torch.tensor([[0, 3]]), ex, (10,))
    assert m == {"recall@10": 0.0, "ndcg@10": 0.0}


def test_ks_validation(gen):
    ue, ie, ex = _data(gen)
    ev = torch.tensor([[4, 10]])
    assert list(ranking_metrics(ue, ie, ev, ex, 5)) == ["recall@5", "ndcg@5"]
    assert list(ranking_metrics(ue, ie, ev, ex, [20, 10, 10])) == ["recall@10", "ndcg@10",
                                                                   "recall@20", "ndcg@20"]
    for bad in ((), (0,), (5, -1), (2.5,), (True,)):
        with pytest.raises(ValueError, match="ks"):
            ranking_metrics(ue, ie, ev, ex, bad)
    with pytest.raises(TypeError, match="ks"):
        ranking_metrics(ue, ie, ev, ex, None)


def test_errors_name_arguments(gen):
    ue, ie, ex = _data(gen)
    users = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="item_emb"):
        full_sort_topk(ue, ie[:, :3], users, ex, 5)
    with pytest.raises(TypeError, match="user_emb"):
        full_sort_topk(ue.long(), ie, users, ex, 5)
    with pytest.raises(ValueError, match="exclude"):
        full_sort_topk(ue, ie, users, ex[:, :1], 5)
    with pytest.raises(TypeError, match="users"):
        full_sort_topk(ue, ie, users.float(), ex, 5)
    with pytest.raises(IndexError, match="users"):
        full_sort_topk(ue, ie, torch.tensor([ue.shape[0]]), ex, 5)
    with pytest.raises(IndexError, match="exclude"):
        full_sort_topk(ue, ie, users, torch.tensor([[0, ie.shape[0]]]), 5)
    with pytest.raises(ValueError, match="k"):
        full_sort_topk(ue, ie, users, ex, 0)
    with pytest.raises(ValueError, match="item_block"):
        full_sort_topk(ue, ie, users, ex, 5, item_block=0)
    with pytest.raises(ValueError, match="user_block"):
        full_sort_topk(ue, ie, users, ex, 5, user_block=0)
    bad = ie.clone()
    bad[3, 0] = float("nan")
    with pytest.raises(ValueError, match="item_emb"):
        full_sort_topk(ue, bad, users, ex, 5)
    with pytest.raises(ValueError, match="eval_pairs"):
        ranking_metrics(ue, ie, torch.zeros(0, 2, dtype=torch.long), ex)
    with pytest.raises(IndexError, match="eval_pairs"):
        ranking_metrics(ue, ie, torch.tensor([[0, ie.shape[0]]]), ex)
    with pytest.raises(ValueError, match="exclude_pairs"):
        ranking_metrics(ue, ie, torch.tensor([[0, 1]]), ex.T)
