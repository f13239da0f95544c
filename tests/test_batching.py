"""unclip_jax.utils.batching: fixed-shape batches that cover every index once."""
from unclip_jax.utils.batching import padded_batches


def test_padded_batches_cover_each_index_once_at_one_shape():
    for n, b in [(5, 2), (4, 2), (1, 3), (7, 7), (8, 3)]:
        got = list(padded_batches(n, b))
        assert [i for i, _, _ in got] == list(range(len(got)))
        assert all(len(idx) == b for _, _, idx in got)  # one shape: one compile
        real = [k for _, m, idx in got for k in idx[:m]]
        assert real == list(range(n))  # cut to the real count: each index once, in order
        for _, m, idx in got:  # padding repeats the batch's last real index
            assert set(idx[m:]) <= {idx[m - 1]}
    assert list(padded_batches(0, 4)) == []
