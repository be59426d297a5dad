"""llama.cpp types gguf-py lacks (Q2_0 in gguf 0.19), registered into gguf-py's tables: the enums and the size table
know them, registering twice changes nothing, a clashing gguf-py is refused, and a Q2_0 file written by stock
llama.cpp reads back (gguf-py's reader and twinquant's loader) with libggml's own values."""

import ctypes
import enum

import gguf
import numpy as np
import pytest

from tests import ggml_oracle
from tests.tiny_models import save_tiny
from twinquant import gguf_types
from twinquant.io.gguf_read import load_gguf
from twinquant.io.gguf_write import write_gguf
from twinquant.io.hf import load_hf_dir


def test_q2_0_is_known_to_gguf_py_with_llama_cpp_numbers():
    T = gguf.GGMLQuantizationType
    assert T.Q2_0 == 42 and T(42) is T.Q2_0 and T["Q2_0"] is T.Q2_0 and T.Q2_0.name == "Q2_0"
    assert T.Q2_0 in list(T) and isinstance(T.Q2_0, T)
    assert gguf.GGML_QUANT_SIZES[T.Q2_0] == (64, 18)
    assert gguf.LlamaFileType.MOSTLY_Q2_0 == 41 and gguf.LlamaFileType(41) is gguf.LlamaFileType.MOSTLY_Q2_0
    n = len(T)
    gguf_types.register()                                # a second time: nothing changes
    assert len(T) == n and T(42) is T.Q2_0


def test_a_gguf_py_that_gives_the_number_to_another_type_is_refused():
    class Other(enum.IntEnum):
        A = 1
        B = 42

    with pytest.raises(RuntimeError, match="gives 42 to B, not Q2_0"):
        gguf_types._add_member(Other, "Q2_0", 42)
    gguf_types._add_member(Other, "C", 7)
    assert Other.C == 7 and Other(7) is Other.C and Other["C"] is Other.C and list(Other)[-1] is Other.C
    gguf_types._add_member(Other, "C", 7)                 # the same member again: no-op
    assert len(Other) == 3


def test_stock_llama_cpp_q2_0_file_reads_back_with_libggml_values(tmp_path):
    import llama_cpp

    # qwen2: its GGUF keeps q/k as the model has them (llama's are stored permuted for llama.cpp's rope)
    hf = save_tiny("qwen2", tmp_path / "hf", tokenizer=True, hidden_size=192, intermediate_size=320,
                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    src = write_gguf(load_hf_dir(hf), tmp_path / "f32.gguf", "F32")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(gguf.LlamaFileType.MOSTLY_Q2_0)
    dst = tmp_path / "q2_0.gguf"
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) == 0
    tensors = {t.name: t for t in gguf.GGUFReader(dst).tensors}
    q2 = [n for n, t in tensors.items() if t.tensor_type == gguf.GGMLQuantizationType.Q2_0]
    assert "blk.0.ffn_down.weight" in q2                    # rows of 320 = 5 blocks of 64
    model = load_gguf(dst).materialize()
    for name in q2:
        t = tensors[name]
        data = np.asarray(t.data)
        cols = data.shape[1] // 18 * 64
        theirs = ggml_oracle.dequantize(data, gguf.GGMLQuantizationType.Q2_0, cols)
        assert np.array_equal(model.get(name).float().numpy().reshape(theirs.shape), theirs), name
