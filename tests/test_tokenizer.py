"""Tokenizer tests: llama.cpp (llama-cpp-python) is the oracle for encode, decode, add_bos and eog ids."""

import json
from pathlib import Path

import gguf
import llama_cpp
import numpy as np
import pytest
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from twinquant import zoo
from twinquant.errors import TwinquantError
from twinquant.io.tokenizer import (
    CONTROL,
    PRE_TYPES,
    SUPPORTED_PRE_TYPES,
    UNUSED,
    USER_DEFINED,
    Tokenizer,
    load_tokenizer,
    write_tokenizer_metadata,
)

SMOLLM2 = zoo.resolve("smollm2-135m")  # finds the file without importing the package (it imports `llm`)
WIKI = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"

TRICKY = [
    "12345 3.14159 1000000 x2y 0.5%",
    "don't I'll WE'RE it's 'S they'd you've",
    "héllo 世界 🚀 naïve café",
    "a  \n\n  b\t\tc",
    " leading space",
    "   three leading, two trailing  ",
    "def f(x):\r\n    return x**2  # comment\n\n\n",
    "日本語のテキスト、カタカナ。한국어 텍스트 ①½Ⅻ٣",
    "!!!...???,,, ---===>>> $100 #tag @user ~~ `code` {a: [1, 2]}",
    "\u00a0nbsp\u3000ideographic\u2028line sep \x0c form feed",
    "e\u0301 a\u0308 combining marks",
    "<|im_start|>user\nhi<|im_end|>",  # special-token text stays plain text
    "\n",
    " ",
    "",
]


def _wiki(n_chars: int) -> str:
    return WIKI.read_text(encoding="utf-8")[:n_chars]


def _llama(path) -> llama_cpp.Llama:
    return llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)


def _llama_eog(llm: llama_cpp.Llama, n: int) -> set[int]:
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    return {i for i in range(n) if llama_cpp.llama_vocab_is_eog(vocab, i)}


def _llama_add_bos(llm: llama_cpp.Llama) -> bool:
    return bool(llama_cpp.llama_vocab_get_add_bos(llama_cpp.llama_model_get_vocab(llm.model)))


def _write_gguf(path: Path, write_tokenizer) -> Path:
    """A minimal llama-architecture GGUF (tiny hyper-parameters, zero token_embd) around some tokenizer keys."""
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(16)
    writer.add_head_count(1)
    writer.add_layer_norm_rms_eps(1e-5)
    n_vocab = write_tokenizer(writer)
    writer.add_tensor("token_embd.weight", np.zeros((n_vocab, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _write_with(tok: Tokenizer):
    def write(writer):
        write_tokenizer_metadata(writer, tok)
        return tok.vocab_size

    return write


# --- the real model: SmolLM2 ---


@pytest.fixture(scope="module")
def smol() -> Tokenizer:
    return load_tokenizer(SMOLLM2)


@pytest.fixture(scope="module")
def smol_llama() -> llama_cpp.Llama:
    return _llama(SMOLLM2)


def test_smollm2_metadata(smol, smol_llama):
    assert smol.pre == "smollm"
    assert smol.vocab_size == 49152 == smol_llama.n_vocab()
    assert (smol.bos_id, smol.eos_id) == (smol_llama.token_bos(), smol_llama.token_eos())
    assert smol.add_bos is _llama_add_bos(smol_llama)
    assert smol.eog_ids == _llama_eog(smol_llama, smol.vocab_size)
    assert smol.chat_template and "<|im_start|>" in smol.chat_template
    assert smol.token_text(1) == "<|im_start|>"


@pytest.mark.parametrize("text", [_wiki(20_000), *TRICKY], ids=["wiki20k", *map(repr, TRICKY)])
def test_smollm2_encode_matches_llama_cpp(smol, smol_llama, text):
    ref = smol_llama.tokenize(text.encode(), add_bos=False, special=False)
    assert smol.encode(text, add_bos=False) == ref
    assert smol.decode(ref) == text
    # llama-cpp-python's add_bos=True means "add BOS if the model wants it", our None does the same.
    assert smol.encode(text) == smol_llama.tokenize(text.encode(), add_bos=True, special=False)


def test_smollm2_forced_bos_and_decode_of_control_tokens(smol, smol_llama):
    assert smol.encode("hi", add_bos=True) == [smol.bos_id, *smol.encode("hi", add_bos=False)]
    ids = [smol.bos_id, *smol.encode("Hello, world!", add_bos=False), smol.eos_id, 0, 5]
    assert smol.decode(ids) == smol_llama.detokenize(ids).decode() == "Hello, world!"


# --- every supported pre type, against llama.cpp, on SmolLM2's vocabulary ---

PRE_TEXT = _wiki(4_000) + "\n".join(TRICKY) + "  end 123456789 ｱｲｳ ぁあ 你好 ﬁ ΩΣω 𐐀𐐨 µ ’quote’ 　x"


@pytest.mark.parametrize("pre", SUPPORTED_PRE_TYPES)
def test_pre_type_matches_llama_cpp(smol, tmp_path, pre):
    tok = Tokenizer(
        tokens=smol.tokens, token_types=smol.token_types, merges=smol.merges, pre=pre,
        bos_id=smol.bos_id, eos_id=smol.eos_id, chat_template=None,
    )  # fmt: skip

    def write(writer):  # no add_bos_token key: llama.cpp must pick the pre type's default, as we do
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tok.tokens)
        writer.add_token_types(tok.token_types)
        writer.add_token_merges(tok.merges)
        writer.add_bos_token_id(tok.bos_id)
        writer.add_eos_token_id(tok.eos_id)
        return tok.vocab_size

    llm = _llama(_write_gguf(tmp_path / f"{pre}.gguf", write))
    assert tok.add_bos is _llama_add_bos(llm)
    for text in [PRE_TEXT, *TRICKY]:
        assert tok.encode(text, add_bos=False) == llm.tokenize(text.encode(), add_bos=False, special=False), text


# --- a tiny Hugging Face tokenizer directory, through our GGUF writer and back ---

# tokenizer.json spellings of the Qwen2 and Llama 3 regexes (llama.cpp rewrites their case-insensitive group)
QWEN2_HF_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_HF_REGEX = QWEN2_HF_REGEX.replace(r"|\p{N}|", r"|\p{N}{1,3}|")


def _split_then_bytes(*regexes):
    splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
    return pre_tokenizers.Sequence([*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


HF_PRE_TOKENIZERS = {
    "gpt-2": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    "smollm": lambda: pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    ),
    "qwen2": lambda: _split_then_bytes(QWEN2_HF_REGEX),
    "llama-bpe": lambda: _split_then_bytes(LLAMA3_HF_REGEX),
    "deepseek-v3": lambda: _split_then_bytes(*PRE_TYPES["deepseek-v3"].regexes),
}
TRAIN = [
    "The quick brown fox jumps over the lazy dog. It's 12:45 and I'll be there at 3.14159!",
    "Tokenizers split text into pieces; byte-level BPE never meets an unknown character.",
    "héllo wörld, 世界 says hello back, don't worry about the numbers 123456 and 7890.",
] * 20
SAMPLE = "The lazy dog's 2nd fox said: héllo <tool_call>{\"x\": 42}</tool_call> — 世界!\n\n  <|im_end|> end  "


def _make_hf_dir(path: Path, pre: str) -> Path:
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = HF_PRE_TOKENIZERS[pre]()
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train_from_iterator(TRAIN, trainer)
    hf.add_tokens([AddedToken("<tool_call>", special=False), AddedToken("</tool_call>", special=False)])
    path.mkdir()
    hf.save(str(path / "tokenizer.json"))
    config = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "add_bos_token": True, "chat_template": "{{x}}"}
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    (path / "config.json").write_text(json.dumps({"vocab_size": hf.get_vocab_size() + 5, "pad_token_id": 0}))
    return path


@pytest.mark.parametrize("pre", sorted(HF_PRE_TOKENIZERS))
def test_hf_dir_to_gguf_round_trip(tmp_path, pre):
    hf_dir = _make_hf_dir(tmp_path / "hf", pre)
    tok = load_tokenizer(hf_dir)
    hf = HFTokenizer.from_file(str(hf_dir / "tokenizer.json"))
    n_hf = hf.get_vocab_size()
    assert tok.pre == pre
    assert tok.vocab_size == n_hf + 5  # padded to config.json's vocab_size
    assert tok.token_types[hf.token_to_id("<|im_end|>")] == CONTROL
    assert tok.token_types[hf.token_to_id("<tool_call>")] == USER_DEFINED
    assert (tok.token_text(n_hf), tok.token_types[n_hf]) == (f"[PAD{n_hf}]", UNUSED)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (hf.token_to_id("<|im_start|>"), hf.token_to_id("<|im_end|>"), 0)
    assert tok.add_bos is True and tok.chat_template == "{{x}}"
    assert tok.eog_ids == {hf.token_to_id("<|endoftext|>"), tok.eos_id}
    ids = tok.encode(SAMPLE, add_bos=False)
    assert hf.token_to_id("<tool_call>") in ids and tok.eos_id not in ids  # user-defined yes, control no
    assert tok.decode(ids) == SAMPLE
    plain = SAMPLE.replace("<tool_call>", "").replace("</tool_call>", "").replace("<|im_end|>", "")
    assert tok.encode(plain, add_bos=False) == hf.encode(plain, add_special_tokens=False).ids

    path = _write_gguf(tmp_path / "tiny.gguf", _write_with(tok))
    back = Tokenizer.from_gguf(gguf.GGUFReader(path))
    for attr in ("pre", "tokens", "token_types", "merges", "bos_id", "eos_id", "pad_id", "add_bos", "eog_ids"):
        assert getattr(back, attr) == getattr(tok, attr), attr
    assert back.chat_template == tok.chat_template
    assert back.encode(SAMPLE) == tok.encode(SAMPLE) == [tok.bos_id, *ids]

    llm = _llama(path)  # stock llama.cpp loads what we wrote and tokenizes the same way
    assert llm.tokenize(SAMPLE.encode(), add_bos=True, special=False) == tok.encode(SAMPLE)
    assert tok.eog_ids == _llama_eog(llm, tok.vocab_size)


# --- errors ---


def test_unknown_pre_type_is_an_error(smol):
    with pytest.raises(TwinquantError, match="'no-such-pre'.*supported: .*smollm"):
        Tokenizer(tokens=smol.tokens, token_types=smol.token_types, merges=smol.merges, pre="no-such-pre")


def test_unsupported_tokenizer_model_is_an_error(tmp_path):
    def write(writer):
        writer.add_tokenizer_model("llama")
        writer.add_token_list(["<unk>", "<s>", "</s>", "a"])
        return 4

    reader = gguf.GGUFReader(_write_gguf(tmp_path / "spm.gguf", write))
    with pytest.raises(TwinquantError, match="unsupported tokenizer model 'llama'"):
        Tokenizer.from_gguf(reader)


def test_hf_dir_errors(tmp_path):
    hf_dir = _make_hf_dir(tmp_path / "hf", "qwen2")
    data = json.loads((hf_dir / "tokenizer.json").read_text())
    data["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\w+|\s+"
    (hf_dir / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(TwinquantError, match="unknown tokenizer.json pre-tokenizer regexes"):
        load_tokenizer(hf_dir)

    data["model"] = {"type": "Unigram", "vocab": [["a", 0.0]]}
    (hf_dir / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(TwinquantError, match="unsupported tokenizer model 'Unigram'"):
        load_tokenizer(hf_dir)

    with pytest.raises(TwinquantError, match="not found"):
        load_tokenizer(tmp_path)
    with pytest.raises(TwinquantError, match="neither a model directory nor a .gguf file"):
        load_tokenizer(tmp_path / "missing.gguf")
