"""The LM family's offline data: corpus cleaning, the split by document, the tokenizer, the cache, and
the checkpointable iterator."""

import json

import numpy as np
import pytest

from experiments.lm import data


def test_clean_strips_markdown():
    text = "# Title\n\n## ACT I\n\n**HAMLET**  \nTo be, or not to be:  \n_Exit HAMLET_\n\n\n\nEnd"
    assert data.clean(text) == "Title\n\nACT I\n\nHAMLET\nTo be, or not to be:\nExit HAMLET\n\nEnd\n"
    assert data.clean("a snake_case_word stays") == "a snake_case_word stays\n"


def test_corpus_is_the_installed_plays_split_by_document():
    docs = data.documents()
    assert len(docs) == 38 and sum(len(t) for _, t in docs) > 4_000_000
    train, held = data.split(docs, 10)
    assert [n for n, _ in held] == [docs[i][0] for i in (9, 19, 29)]
    assert not {n for n, _ in train} & {n for n, _ in held} and len(train) + len(held) == 38
    with pytest.raises(ValueError, match="held_out_every"):
        data.split(docs, 1)


def test_prepare_builds_once_and_round_trips(tmp_path):
    cfg = data.DataConfig(vocab_size=512, held_out_every=2, n_docs=2)
    c = data.prepare(cfg, tmp_path)
    tok = c.tokenizer()
    assert tok.get_vocab_size() == 512 and tok.token_to_id(data.EOT) == 0
    assert c.train.dtype == np.uint16 and c.train.max() < 512 and c.held_out.size > 1000
    train_doc = data.documents(2)[0][1]
    assert tok.decode(c.train[: int(np.argmax(c.train == 0))].tolist()) == train_doc  # byte-level: lossless
    assert c.info["train_docs"] == [data.documents(2)[0][0]] and c.info["held_out_docs"] == [data.documents(2)[1][0]]
    (d,) = [p for p in tmp_path.iterdir()]
    mtime = (d / "train.npy").stat().st_mtime_ns
    again = data.prepare(cfg, tmp_path)  # from the cache
    np.testing.assert_array_equal(again.train, c.train)
    assert (d / "train.npy").stat().st_mtime_ns == mtime
    (d / "info.json").write_text("{")
    with pytest.raises(ValueError, match="damaged"):
        data.prepare(cfg, tmp_path)


def test_iterator_resumes_at_the_same_position(tmp_path):
    tokens = np.arange(10_000, dtype=np.uint16)
    ds = data.train_dataset(tokens, seq_len=16, batch_size=4, seed=0)
    it = iter(ds.to_iter_dataset())
    first = [next(it)["tokens"] for _ in range(3)]
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it)["tokens"] for _ in range(3)]
    it2 = iter(data.train_dataset(tokens, seq_len=16, batch_size=4, seed=0).to_iter_dataset())
    it2.set_state(state)
    for e in expected:
        np.testing.assert_array_equal(next(it2)["tokens"], e)
    b = first[0]
    assert b.shape == (4, 16) and b.dtype == np.int32
    assert ((b[:, 1:] - b[:, :-1]) == 1).all() and (b[:, 0] % 16 == 0).all()  # whole windows
    ranks = [next(iter(data.train_dataset(tokens, 16, 4, 0, rank=r, n_proc=2).to_iter_dataset()))["tokens"] for r in (0, 1)]
    np.testing.assert_array_equal(np.concatenate(ranks)[[0, 2, 1, 3]], first[0])
