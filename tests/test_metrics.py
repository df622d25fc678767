"""retrac_lib.evaluation.metrics on tiny cases counted by hand, and its error messages.

The 3 x 5 score matrix below (3 queries, 5 training samples) has these top-2 proponents:

    query 0: samples 4, 1      query 1: samples 4, 0      query 2: samples 2, 4

so sample 4 is in all three top-2 lists, samples 0, 1 and 2 in one each, sample 3 in none.
"""
import numpy as np
import scipy.stats
from types import SimpleNamespace

import pytest
import torch

import retrac_lib as rl
from retrac_lib import ranking
from retrac_lib.evaluation import metrics

SCORES = torch.tensor([
    [0.1, 0.8, -0.5, 0.0, 0.9],
    [0.7, -0.2, 0.3, 0.1, 0.95],
    [-0.3, 0.2, 0.9, -0.9, 0.4],
])
TOP2 = torch.tensor([[4, 1], [4, 0], [2, 4]])


def test_top_k_matches_hand_count_and_checks_k():
    assert metrics.top_k(SCORES, 2).tolist() == TOP2.tolist()
    assert metrics.top_k(SCORES, 1, largest=False).flatten().tolist() == [2, 1, 3]
    with pytest.raises(ValueError, match="between 1 and the number of training samples \\(5\\)"):
        metrics.top_k(SCORES, 6)
    with pytest.raises(ValueError, match="between 1"):
        metrics.top_k(SCORES, 0)
    with pytest.raises(ValueError, match="queries, training samples"):
        metrics.top_k(SCORES[0], 2)


def test_appearance_distinct_and_generally_influential():
    assert metrics.appearance_counts(TOP2, 5).tolist() == [1, 1, 1, 0, 3]
    assert metrics.distinct_proponents(TOP2) == 4          # {0, 1, 2, 4}
    idx, counts = metrics.generally_influential(TOP2, share=0.5)
    assert idx.tolist() == [4] and counts.tolist() == [3]  # only sample 4 is in >= 1.5 lists
    idx, counts = metrics.generally_influential(TOP2, share=1 / 3)
    assert idx.tolist() == [4, 0, 1, 2] and counts.tolist() == [3, 1, 1, 1]
    idx, _ = metrics.generally_influential(torch.tensor([[0, 1], [1, 2]]), share=0.5)
    assert idx.tolist() == [1, 0, 2], "exactly half of the queries counts as 'at least half'"


def test_pairwise_overlap_by_hand():
    # pairs (0,1): {4} -> 1/2; (0,2): {4} -> 1/2; (1,2): {4} -> 1/2
    assert metrics.pairwise_overlap(TOP2) == pytest.approx(0.5)
    assert metrics.pairwise_overlap(torch.tensor([[0, 1], [0, 1]])) == pytest.approx(1.0)
    assert metrics.pairwise_overlap(torch.tensor([[0, 1], [2, 3]])) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="at least two queries"):
        metrics.pairwise_overlap(TOP2[:1])


def test_top_errors_are_helpful():
    with pytest.raises(ValueError, match="only 4 training samples"):
        metrics.appearance_counts(TOP2, 4)
    with pytest.raises(ValueError, match="not scores"):
        metrics.distinct_proponents(SCORES)
    with pytest.raises(ValueError, match="same training sample twice"):
        metrics.distinct_proponents(torch.tensor([[1, 1]]))
    with pytest.raises(ValueError, match="share"):
        metrics.generally_influential(TOP2, share=0)


def test_proponent_timesteps_pools_checkpoints():
    t = torch.tensor([[10, 20, 30, 40, 50], [1, 2, 3, 4, 5]])  # [C=2, N=5]
    prop, everyone = metrics.proponent_timesteps(TOP2[:1], t)
    assert sorted(prop.tolist()) == sorted([50, 20, 5, 2])
    assert sorted(everyone.tolist()) == sorted(t.flatten().tolist())
    prop, _ = metrics.proponent_timesteps(TOP2[:1], t[0])
    assert prop.tolist() == [50, 20]


def test_norms_and_dominant_timesteps():
    norms = torch.tensor([[1.0, 4.0, 2.0], [3.0, 2.0, 2.0]])
    assert metrics.sample_norms(norms).tolist() == [2.0, 3.0, 2.0]
    assert metrics.sample_norms(norms, torch.tensor([1.0, 3.0])).tolist() == [2.5, 2.5, 2.0]
    t = torch.tensor([[100, 200, 300], [7, 8, 9]])
    assert metrics.dominant_timesteps(t, norms).tolist() == [7, 200, 300]  # ties: first checkpoint
    assert metrics.dominant_timesteps(t, norms, torch.tensor([1.0, 3.0])).tolist() == [7, 8, 9]
    with pytest.raises(ValueError, match="checkpoints, training samples"):
        metrics.dominant_timesteps(t[:, :2], norms)
    with pytest.raises(ValueError, match="3 checkpoint weights for 2"):
        metrics.sample_norms(norms, torch.ones(3))


def test_norm_percentile_by_hand():
    norms = torch.tensor([5.0, 1.0, 3.0, 2.0, 4.0])  # percentiles 1, 0, .5, .25, .75
    assert metrics.norm_percentile(torch.tensor([[0, 4]]), norms) == pytest.approx(0.875)
    assert metrics.norm_percentile(torch.tensor([[1], [3]]), norms) == pytest.approx(0.125)


def test_rank_and_spearman_handle_ties():
    assert metrics.rank(torch.tensor([3.0, 1.0, 3.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]
    assert metrics.rank(torch.tensor([[2.0, 1.0], [1.0, 1.0]])).tolist() == [[2, 1], [1.5, 1.5]]
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert float(metrics.spearman(x, x ** 3)) == 1.0 and float(metrics.spearman(x, -x)) == -1.0
    assert float(metrics.spearman(x, torch.ones(4))) == 0.0   # a constant side ranks nothing
    scipy_stats = pytest.importorskip("scipy.stats")
    a, b = torch.randn(2, 30, generator=torch.Generator().manual_seed(0)).round(decimals=1)
    assert float(metrics.spearman(a, b)) == pytest.approx(scipy_stats.spearmanr(a, b)[0], abs=1e-9)
    rows = torch.randn(5, 30, generator=torch.Generator().manual_seed(1)).round(decimals=1)
    expected = [scipy_stats.spearmanr(r, b)[0] for r in rows]   # each row against one shared b
    assert metrics.spearman(rows, b).tolist() == pytest.approx(expected, abs=1e-12)


def test_top_k_overlap_by_hand():
    a = torch.tensor([[4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0]])
    b = torch.tensor([[4.0, 1.0, 3.0, 2.0], [1.0, 2.0, 3.0, 4.0]])
    # query 0: top-2 {0, 1} against {0, 2}: one shared; query 1: the same ranking
    assert ranking.top_k_overlap(a, b, k=2).tolist() == [0.5, 1.0]
    assert ranking.top_k_overlap(a, b, k=9).tolist() == [1.0, 1.0]   # k capped at N
    with pytest.raises(ValueError, match=r"same queries and samples; got shapes \(2, 4\) and"):
        ranking.top_k_overlap(a, b[:, :3])


def test_norm_influence_correlation():
    norms = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    signs = torch.tensor([[1.0, -1.0, 1.0, -1.0, 1.0], [-1.0, -1.0, 1.0, 1.0, -1.0]])
    scores = signs * norms                           # |score| is the norm: a perfect relation
    assert metrics.norm_influence_correlation(scores, norms) == pytest.approx(1.0)
    signed = metrics.norm_influence_correlation(scores, norms, absolute=False)
    assert signed < 0.5, "the signed score hides the relation; that is why absolute is the default"
    with pytest.raises(ValueError, match="4 entries per row but there are 5 training samples"):
        metrics.norm_influence_correlation(scores, norms[:4])


def test_same_label_rate_by_hand():
    train_labels = torch.tensor([0, 1, 1, 0, 2])
    # query labels 2, 0, 1: proponents' labels [2, 1], [2, 0], [1, 2] -> matches 1 + 1 + 1 of 6
    assert metrics.same_label_rate(TOP2, train_labels, torch.tensor([2, 0, 1])) == pytest.approx(0.5)
    assert metrics.same_label_rate(TOP2, train_labels, torch.tensor([9, 9, 9])) == 0.0
    with pytest.raises(ValueError, match="2 query labels for 3 queries"):
        metrics.same_label_rate(TOP2, train_labels, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="only 3 training samples"):
        metrics.same_label_rate(TOP2, train_labels[:3], torch.tensor([0, 1, 2]))


def test_self_rank_by_hand():
    # query 0 is sample 4 (top: rank 1), query 1 is sample 2 (0.95, 0.7 above: rank 3),
    # query 2 is sample 3 (lowest of five: rank 5)
    assert metrics.self_rank(SCORES, [4, 2, 3]).tolist() == [1, 3, 5]
    with pytest.raises(ValueError, match="2 training indices for 3 queries"):
        metrics.self_rank(SCORES, [4, 2])
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        metrics.self_rank(SCORES, [4, 2, 5])


def _fake_run_and_result(scores, norms, recorded_t, labels):
    run = SimpleNamespace(data=SimpleNamespace(labels=labels))
    result = SimpleNamespace(
        scores=scores, train_grad_norms=norms, checkpoint_weights=torch.ones(len(norms)),
        config=SimpleNamespace(checkpoints=tuple(range(len(norms)))),
        proponents=lambda k: metrics.top_k(scores, k), recorded_timesteps=lambda run: recorded_t)
    return run, result


def test_summary_table_collects_every_metric():
    norms = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0]])
    run, res = _fake_run_and_result(SCORES, norms, torch.tensor([[900, 800, 10, 500, 50]]),
                                    torch.tensor([0, 1, 1, 0, 2]))
    _, flat = _fake_run_and_result(torch.ones(3, 5) + torch.arange(5.0).flip(0), norms,
                                   torch.tensor([[900, 800, 10, 500, 50]]), torch.tensor([0, 1, 1, 0, 2]))
    table = metrics.summary_table({"tracin": res, "retrac": flat}, run,
                                  query_labels=torch.tensor([2, 0, 1]), k=2, share=0.5,
                                  self_scores={"tracin": res, "retrac": flat.scores}, self_indices=[4, 2, 3])
    assert table.columns == ["tracin", "retrac"]
    assert table.value("distinct", "tracin") == 4 and table.value("distinct", "retrac") == 2
    assert table.value("samples in top-2", "tracin") == 1
    assert table.value("samples in top-2", "retrac") == 2
    assert table.value("same-label", "tracin") == pytest.approx(0.5)
    assert table.value("median self-rank", "tracin") == 3
    assert table.value("median recorded t of proponents", "tracin") == 50  # t of 4,1,4,0,2,4
    flipped = table.transpose({"distinct": "distinct", "same": "same-label"})
    assert flipped.columns == ["distinct", "same"] and [r for r, _ in flipped.rows] == ["tracin", "retrac"]
    assert flipped.value("retrac", "distinct") == 2
    text = str(table)
    assert "tracin" in text and "distinct top-2 proponents (of 6)" in text
    with pytest.raises(KeyError, match="matches 0 rows"):
        table.value("no such metric", "tracin")
    with pytest.raises(KeyError, match="no column"):
        table.value("distinct", "dtrak")
    with pytest.raises(ValueError, match="self-attribution scores for every method"):
        metrics.summary_table({"tracin": res, "retrac": flat}, run, self_scores={"tracin": res},
                              self_indices=[4, 2, 3])


def test_summary_on_a_real_attribution(tiny_run):
    queries = tiny_run.data.images[:3]
    res = rl.attribute(tiny_run, queries, "tracin", timesteps=3, n_noise=1, progress=False)
    table = metrics.summary_table(res, tiny_run, query_labels=tiny_run.data.labels[:3], k=4,
                                  self_scores=res, self_indices=[0, 1, 2])
    assert table.columns == ["score"]
    # Every row against a reference computed here from the scores, with NumPy and SciPy.
    scores = res.scores.numpy()
    top = np.argsort(-scores, axis=1, kind="stable")[:, :4]
    labels = tiny_run.data.labels.numpy()
    w = res.checkpoint_weights.numpy()
    norms = (w[:, None] * res.train_grad_norms.double().numpy()).sum(0) / w.sum()
    pct = (scipy.stats.rankdata(norms) - 1) / (len(norms) - 1)
    t = np.stack([tiny_run.recorded(c)[0].numpy() for c in res.config.checkpoints])
    self_ranks = [1 + (scores[q] > scores[q, q]).sum() for q in range(3)]

    def lower_median(x):  # torch.median's convention: the lower middle value of an even count
        return np.sort(np.ravel(x))[(np.size(x) - 1) // 2]
    expected = {
        "distinct": len(set(top.flatten().tolist())),
        "same-label": (labels[top] == labels[:3, None]).mean(),
        "rank corr": np.mean([scipy.stats.spearmanr(np.abs(scores[q]), norms)[0] for q in range(3)]),
        "norm percentile": pct[top].mean(),
        "median recorded t of proponents": lower_median(t[:, top.flatten()]),
        "median recorded t of all": lower_median(t),
        "median self-rank": lower_median(self_ranks),
    }
    for name, value in expected.items():
        assert table.value(name, "score") == pytest.approx(value, rel=1e-9), name


def test_attribution_explorer_constructs_without_a_display(tiny_run):
    """Chapter 4's explorer (in retrac_lib.book.widgets) builds and redraws from precomputed scores, headless."""
    import matplotlib
    matplotlib.use("Agg")
    from retrac_lib.book import widgets

    queries = tiny_run.data.images[:2]
    results = {m: rl.attribute(tiny_run, queries, m, timesteps=2, n_noise=1, progress=False)
               for m in ("tracin", "retrac")}
    box = widgets.attribution_explorer(results, tiny_run, queries, query_names=["a", "b"], k=3, max_k=5)
    assert box.figure is not None and bytes(box.image.value).startswith(b"\x89PNG")
    first = bytes(box.image.value)
    box.method.value, box.query.value, box.k.value = "retrac", 1, 5
    redrawn = bytes(box.image.value)
    assert redrawn.startswith(b"\x89PNG") and redrawn != first
    assert "top-5 proponents of b" in box.figure.texts[0].get_text() or \
        any("top-5" in t.get_text() for t in box.figure.texts)
    with pytest.raises(ValueError, match="expected \\[3 queries"):
        widgets.attribution_explorer(results, tiny_run, tiny_run.data.images[:3])
    with pytest.raises(ValueError, match="max_k"):
        widgets.attribution_explorer(results, tiny_run, queries, k=6, max_k=5)
