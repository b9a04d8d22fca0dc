"""Text sources and packing into contexts with one BOS each."""

import json
from itertools import islice

import pytest
from transformers import AutoTokenizer

from sae.data import context_batches, iter_documents, pack_contexts, stdlib_source_files


@pytest.fixture(scope="module")
def tokenizer(tiny_lm_dir):
    return AutoTokenizer.from_pretrained(tiny_lm_dir)


def test_stdlib_corpus_is_present_seeded_and_has_no_tests():
    files = stdlib_source_files(seed=0)
    assert len(files) > 300
    assert files == stdlib_source_files(seed=0)
    assert files != stdlib_source_files(seed=1)
    assert sorted(files) == sorted(stdlib_source_files(seed=1))
    assert not any("site-packages" in f.parts or "test" in f.parts for f in files)


def test_packing_gives_one_bos_per_context_and_keeps_the_stream(tokenizer):
    docs = ["def f(x):\n    return x\n", "Hello world. " * 40, "a"]
    contexts = list(pack_contexts(docs, tokenizer, context_size=16))
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    assert contexts and all(len(c) == 16 and c[0] == bos and c.count(bos) == 1 for c in contexts)
    stream = [t for c in contexts for t in c[1:]]
    expected = [t for d in docs for t in tokenizer(d, add_special_tokens=False)["input_ids"] + [eos]]
    assert stream == expected[: len(stream)]
    assert len(expected) - len(stream) < 15  # only the incomplete tail is dropped


def test_packing_needs_a_bos(tokenizer):
    class NoBos:
        bos_token_id, eos_token_id = None, 1

    with pytest.raises(ValueError, match="no BOS"):
        next(pack_contexts(["x"], NoBos(), 8))


def test_context_batches_skip_and_shapes(tokenizer):
    contexts = list(islice(pack_contexts(iter_documents("python-stdlib"), tokenizer, 8), 10))
    batches = list(context_batches(iter(contexts), batch_contexts=4, skip_contexts=3))
    assert [tuple(b.shape) for b in batches] == [(4, 8), (3, 8)]
    assert batches[0][0].tolist() == contexts[3]


@pytest.mark.parametrize("kind", ["txt", "jsonl", "parquet"])
def test_local_files(tmp_path, kind):
    texts = ["first document", "second one", "third"]
    path = tmp_path / f"corpus.{kind}"
    if kind == "txt":
        path.write_text("\n".join(texts) + "\n")
    elif kind == "jsonl":
        path.write_text("".join(json.dumps({"content": t}) + "\n" for t in texts))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"content": texts}), path)
    column = "text" if kind == "txt" else "content"
    assert list(iter_documents(str(path), text_column=column)) == texts
    assert list(iter_documents(str(tmp_path), text_column=column)) == texts  # a directory of such files


def test_local_file_errors(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(KeyError, match="no column 'text'"):
        list(iter_documents(str(tmp_path / "a.jsonl")))
    (tmp_path / "b.txt").write_text("y\n")
    with pytest.raises(ValueError, match="one kind"):
        list(iter_documents(str(tmp_path)))
