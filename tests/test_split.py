"""Split GGUF export (llama.cpp's gguf-split convention): shard names and keys, stock llama.cpp loads the set from
the first shard with the unsplit file's logits, our loader merges the shards, failures leave nothing behind."""

import gguf
import numpy as np
import pytest
import torch

from tests.tiny_models import save_tiny
from twinquant.errors import TwinquantError
from twinquant.io.split import parse_size, shard_paths
from twinquant.io.gguf_read import load_gguf
from twinquant.io.gguf_write import write_gguf
from twinquant.io.hf import load_hf_dir
from twinquant.model.forward import forward


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    d = tmp_path_factory.mktemp("split")
    model = load_hf_dir(save_tiny("qwen2", d / "hf", tokenizer=True)).materialize()
    whole = write_gguf(model, d / "whole.gguf", "F32")
    first = write_gguf(model, d / "out" / "m.gguf", "F32", split_max_size="100K")
    return model, whole, first


def _llama_logits(path, toks):
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=2,
                          type_k=0, type_v=0)
    llm.eval(toks)
    return torch.from_numpy(np.array(llm.scores[: len(toks)], dtype=np.float32))


def test_shard_names_and_keys(exported):
    model, _, first = exported
    files = sorted(p.name for p in first.parent.iterdir())
    n = len(files)
    assert n >= 3 and first.name == f"m-00001-of-{n:05d}.gguf"
    assert files == [f"m-{i:05d}-of-{n:05d}.gguf" for i in range(1, n + 1)]     # no temporary files left
    assert shard_paths(first) == [first.parent / f for f in files]
    readers = [gguf.GGUFReader(first.parent / f) for f in files]
    assert [r.fields["split.no"].contents() for r in readers] == list(range(n))
    assert {r.fields["split.count"].contents() for r in readers} == {n}
    names = [t.name for r in readers for t in r.tensors]
    assert readers[0].fields["split.tensors.count"].contents() == len(names) == len(set(names))
    assert sorted(names) == sorted(model.tensor_names())
    for r in readers[1:]:                                    # every shard's tensor data is within the size
        assert sum(int(t.n_bytes) for t in r.tensors) <= 100_000 or len(r.tensors) == 1
    assert "general.architecture" in readers[0].fields and "tokenizer.ggml.tokens" in readers[0].fields


def test_stock_llama_cpp_loads_the_first_shard(exported):
    _, whole, first = exported
    toks = torch.randint(3, 320, (40,)).tolist()
    assert torch.equal(_llama_logits(first, toks), _llama_logits(whole, toks))


def test_our_loader_merges_the_shards(exported):
    model, whole, first = exported
    x = torch.randint(0, 320, (2, 40))
    a, b = load_gguf(first), load_gguf(whole)
    assert a.spec == b.spec
    assert torch.equal(forward(a, x), forward(b, x)) and torch.equal(forward(a, x), forward(model, x))
    last = shard_paths(first)[-1]
    assert torch.equal(forward(load_gguf(last), x), forward(b, x))        # any shard finds the set


def test_missing_shard_is_named(exported, tmp_path):
    _, _, first = exported
    paths = shard_paths(first)
    for p in paths[:1] + paths[2:]:
        (tmp_path / p.name).write_bytes(p.read_bytes())
    with pytest.raises(TwinquantError, match=paths[1].name):
        load_gguf(tmp_path / paths[0].name)
    renamed = tmp_path / "renamed.gguf"
    renamed.write_bytes(paths[0].read_bytes())
    with pytest.raises(TwinquantError, match="not named like"):
        load_gguf(renamed)


def test_small_model_stays_one_file_and_failures_leave_nothing(exported, tmp_path):
    model, _, _ = exported
    path = write_gguf(model, tmp_path / "one.gguf", "F32", split_max_size="2G")
    assert path == tmp_path / "one.gguf" and [p.name for p in tmp_path.iterdir()] == ["one.gguf"]
    out = tmp_path / "bad"
    out.mkdir()

    def boom(i, n, name):
        if i == 5:
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_gguf(model, out / "m.gguf", "F32", progress=boom, split_max_size=50_000)
    assert list(out.iterdir()) == []


def test_parse_size():
    assert parse_size("50M") == 50_000_000 and parse_size("2G") == 2_000_000_000
    assert parse_size("500k") == 500_000 and parse_size("4096") == 4096 and parse_size(123) == 123
    assert parse_size("1.5G") == 1_500_000_000
    for bad in ("", "12X", "-5M", 0, "0"):
        with pytest.raises(TwinquantError):
            parse_size(bad)
