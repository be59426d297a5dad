"""Byte-level BPE tokenizer that reproduces llama.cpp's tokenization.

Evaluation must feed our models exactly the token ids llama.cpp would, so this module mirrors llama.cpp's rules
(pre-tokenizer regexes per `tokenizer.ggml.pre`, user-defined tokens split out first, control tokens never produced
from plain text and dropped on decode) and leaves the heavy lifting (regex splits, byte mapping, BPE merges) to the
`tokenizers` library. Only byte-level BPE (GGUF model "gpt2") is supported.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Regex
from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import models, pre_tokenizers
from tokenizers.pre_tokenizers import ByteLevel

from twinquant.errors import TwinquantError

# GGUF tokenizer.ggml.token_type values.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Pre-tokenizer regexes, as llama.cpp spells them (llama-vocab.cpp). A list is applied in order, each regex
# splitting every piece left by the previous one; matches and the text between them both become pieces.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_CONTRACTIONS_HF = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"  # the tokenizer.json spelling llama.cpp rewrote
_LLAMA3_TAIL = r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN2_TAIL = r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"


@dataclass(frozen=True)
class _Pre:
    regexes: tuple[str, ...]
    hf_spellings: tuple[tuple[str, ...], ...] = ()  # other spellings of the same list found in tokenizer.json
    ignore_merges: bool = False  # llama.cpp: a piece that is itself a token is taken whole
    add_bos: bool = False  # llama.cpp's default when the GGUF has no tokenizer.ggml.add_bos_token


# Canonical llama.cpp names; the first match wins when recognising a tokenizer.json.
PRE_TYPES: dict[str, _Pre] = {
    "gpt-2": _Pre((_GPT2,)),
    "smollm": _Pre((r"\p{N}", _GPT2)),
    "qwen2": _Pre((_CONTRACTIONS + _QWEN2_TAIL,), ((_CONTRACTIONS_HF + _QWEN2_TAIL,),)),
    "llama-bpe": _Pre(
        (_CONTRACTIONS + _LLAMA3_TAIL,), ((_CONTRACTIONS_HF + _LLAMA3_TAIL,),), ignore_merges=True, add_bos=True
    ),
    "deepseek-llm": _Pre(
        (
            "[\r\n]",
            "\\s?[A-Za-z\xb5\xc0-\xd6\xd8-\xf6\xf8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af\u0370-\u0373\u0376"
            "\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1\u03a3-\u03f5\u03f7-\u0481\u048a-\u052f"
            "\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77"
            "\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d"
            "\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb"
            "\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc\u2102\u2107\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128"
            "\u212a-\u212d\u212f-\u2134\u2139\u213c-\u213f\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4"
            "\u2ceb-\u2cee\u2cf2\u2cf3\ua640-\ua66d\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf"
            "\ufb00-\ufb06\ufb13-\ufb17\uff21-\uff3a\uff41-\uff5a\U00010400-\U0001044f\U000104b0-\U000104d3"
            "\U000104d8-\U000104fb\U00010c80-\U00010cb2\U00010cc0-\U00010cf2\U000118a0-\U000118df"
            "\U0001e900-\U0001e943]+",
            "\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+",
            "\\s+$",
            "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+",
            "\\p{N}+",
        )
    ),
    "deepseek-v3": _Pre(
        (
            "\\p{N}{1,3}",
            "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
            "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+"
            "| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+",
        )
    ),
    # llama.cpp's fallback for GGUFs without a pre type; never chosen for a tokenizer.json.
    "default": _Pre((r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", "[0-9][0-9][0-9]")),
}
# Other llama.cpp names that select the same behaviour as a canonical entry.
_PRE_ALIASES = {
    "starcoder": "smollm",
    "refact": "smollm",
    "llama3": "llama-bpe",
    "llama-v3": "llama-bpe",
    "deepseek-r1-qwen": "qwen2",
}
SUPPORTED_PRE_TYPES = tuple(sorted([*PRE_TYPES, *_PRE_ALIASES]))

# Tokens llama.cpp recognises by text as ending generation (and forces to CONTROL): eot/eom-like and FIM markers.
_EOG_TEXTS = frozenset(
    {
        "<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|eom_id|>", "<EOT>",
        "<|end_of_text|>", "<end_of_utterance>", "<\uff5cend\u2581of\u2581sentence\uff5c>",
        "<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<reponame>",
        "<|file_sep|>",
    }
)  # fmt: skip


def _lookup_pre(name: str) -> _Pre:
    pre = PRE_TYPES.get(_PRE_ALIASES.get(name, name))
    if pre is None:
        raise TwinquantError(
            f"unsupported tokenizer pre-tokenizer type {name!r} (supported: {', '.join(SUPPORTED_PRE_TYPES)})"
        )
    return pre


def _byte_decoder() -> dict[str, int]:
    # Inverse of the GPT-2 byte-to-unicode table that ByteLevel uses: printable latin-1 bytes map to themselves,
    # the others to chr(256 + k) in byte order.
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [b for b in range(256) if b not in printable]
    table = {chr(b): b for b in printable}
    table.update({chr(256 + k): b for k, b in enumerate(others)})
    return table


_BYTE_DECODER = _byte_decoder()
_BYTE_TRANSLATION = str.maketrans({c: chr(b) for c, b in _BYTE_DECODER.items()})


def _token_bytes(text: str) -> bytes:
    try:
        return text.translate(_BYTE_TRANSLATION).encode("latin-1")
    except UnicodeEncodeError:  # a char outside the byte alphabet: keep it as UTF-8
        return b"".join(bytes([_BYTE_DECODER[c]]) if c in _BYTE_DECODER else c.encode() for c in text)


class Tokenizer:
    """A byte-level BPE vocabulary plus the llama.cpp pre-tokenizer it is used with."""

    def __init__(
        self,
        *,
        tokens: list[str],
        token_types: list[int],
        merges: list[str],
        pre: str,
        bos_id: int | None = None,
        eos_id: int | None = None,
        pad_id: int | None = None,
        unk_id: int | None = None,
        extra_eog_ids: tuple[int, ...] = (),
        add_bos: bool | None = None,
        chat_template: str | None = None,
    ):
        spec = _lookup_pre(pre)
        if len(token_types) != len(tokens):
            raise TwinquantError(f"tokenizer has {len(tokens)} tokens but {len(token_types)} token types")
        ids = {t: i for i, t in enumerate(tokens)}
        if len(ids) != len(tokens):
            raise TwinquantError("tokenizer vocabulary has duplicate tokens (llama.cpp refuses these)")
        for name, i in (("bos", bos_id), ("eos", eos_id), ("padding", pad_id), ("unknown", unk_id)):
            if i is not None and not 0 <= i < len(tokens):
                raise TwinquantError(f"tokenizer {name} token id {i} is outside the vocabulary of {len(tokens)}")
        self.tokens, self.token_types, self.merges, self.pre = list(tokens), list(token_types), list(merges), pre
        self.vocab_size = len(tokens)
        self.bos_id, self.eos_id, self.pad_id, self.unk_id = bos_id, eos_id, pad_id, unk_id
        self.add_bos = spec.add_bos if add_bos is None else bool(add_bos)
        self.chat_template = chat_template
        eog_by_text = {ids[t] for t in _EOG_TEXTS if t in ids}
        self.eog_ids = frozenset(eog_by_text | {i for i in (eos_id, *extra_eog_ids) if i is not None})

        # Like llama.cpp: control/unknown tokens (and those it forces to control by their eog-looking text) are
        # neither parsed from text nor rendered; user-defined ones are cut out before BPE and rendered verbatim.
        hidden = {i for i, t in enumerate(token_types) if t in (CONTROL, UNKNOWN)} | eog_by_text
        self._user_tokens = sorted(
            ((t, i) for i, t in enumerate(tokens) if token_types[i] == USER_DEFINED and i not in hidden),
            key=lambda ti: len(ti[0]), reverse=True,
        )  # fmt: skip
        self._pieces = [
            b"" if i in hidden or typ == UNUSED
            else tok.encode() if typ == USER_DEFINED
            else _token_bytes(tok)
            for i, (tok, typ) in enumerate(zip(tokens, token_types))
        ]  # fmt: skip

        pairs = []
        for m in merges:
            left, sep, right = m.partition(" ")
            if not sep:
                raise TwinquantError(f"malformed tokenizer merge {m!r} (expected 'left right')")
            pairs.append((left, right))
        try:
            bpe = models.BPE(vocab=ids, merges=pairs, ignore_merges=spec.ignore_merges)
        except Exception as e:  # tokenizers rejects merges whose parts or result are not tokens
            raise TwinquantError(f"tokenizer merges do not match the vocabulary: {e}") from None
        self._bpe = _HFTokenizer(bpe)
        self._bpe.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in spec.regexes]
            + [ByteLevel(add_prefix_space=False, use_regex=False)]
        )

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`; special-token text is encoded as plain text, like llama-perplexity does."""
        out = []
        if self.add_bos if add_bos is None else add_bos:
            if self.bos_id is None:
                raise TwinquantError("cannot add BOS: the tokenizer has no BOS token")
            out.append(self.bos_id)
        for fragment, user_id in self._split_user_tokens(text):
            if user_id is not None:
                out.append(user_id)
            elif fragment:
                out.extend(self._bpe.encode(fragment, add_special_tokens=False).ids)
        return out

    def _split_user_tokens(self, text: str) -> list[tuple[str, int | None]]:
        # llama.cpp's order: longest user-defined token first, splitting every remaining plain fragment.
        parts: list[tuple[str, int | None]] = [(text, None)]
        for tok, tok_id in self._user_tokens:
            if tok not in text:
                continue
            split: list[tuple[str, int | None]] = []
            for frag, fid in parts:
                if fid is not None or tok not in frag:
                    split.append((frag, fid))
                    continue
                for k, piece in enumerate(frag.split(tok)):
                    if k:
                        split.append((tok, tok_id))
                    split.append((piece, None))
            parts = split
        return parts

    def decode(self, ids: list[int]) -> str:
        """Text of `ids` as llama.cpp detokenizes it (control tokens dropped); bad UTF-8 becomes U+FFFD."""
        if any(not 0 <= i < self.vocab_size for i in ids):
            raise TwinquantError(f"token id out of range 0..{self.vocab_size - 1}")
        data = b"".join(self._pieces[i] for i in ids)
        return data.decode("utf-8", errors="replace")

    def token_text(self, i: int) -> str:
        """The token's vocabulary string as stored in the GGUF (byte-level form, e.g. 'Ġthe')."""
        return self.tokens[i]

    @classmethod
    def from_gguf(cls, reader) -> Tokenizer:
        """Read the tokenizer.ggml.* metadata of a GGUF file opened with gguf.GGUFReader."""

        def get(key, default=None):
            field = reader.fields.get(key)
            return default if field is None else field.contents()

        model = get("tokenizer.ggml.model")
        if model is None:
            raise TwinquantError("GGUF file has no tokenizer (tokenizer.ggml.model is missing)")
        if model != "gpt2":
            raise TwinquantError(f"unsupported tokenizer model {model!r}: only 'gpt2' (byte-level BPE) is supported")
        tokens = get("tokenizer.ggml.tokens")
        merges = get("tokenizer.ggml.merges")
        if not tokens or merges is None:
            raise TwinquantError("GGUF tokenizer lacks tokenizer.ggml.tokens or tokenizer.ggml.merges")
        eot_eom = (get("tokenizer.ggml.eot_token_id"), get("tokenizer.ggml.eom_token_id"))
        return cls(
            tokens=tokens,
            token_types=get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens),
            merges=merges,
            pre=get("tokenizer.ggml.pre") or "default",  # llama.cpp's own choice when the key is missing
            bos_id=get("tokenizer.ggml.bos_token_id"),
            eos_id=get("tokenizer.ggml.eos_token_id"),
            pad_id=get("tokenizer.ggml.padding_token_id"),
            unk_id=get("tokenizer.ggml.unknown_token_id"),
            extra_eog_ids=tuple(i for i in eot_eom if i is not None),
            add_bos=get("tokenizer.ggml.add_bos_token"),
            chat_template=get("tokenizer.chat_template"),
        )

    @classmethod
    def from_hf_dir(cls, path) -> Tokenizer:
        """Read a Hugging Face model directory: tokenizer.json, plus tokenizer_config.json and config.json."""
        path = Path(path)
        tj = _read_json(path / "tokenizer.json", required=True)
        tcfg = _read_json(path / "tokenizer_config.json")
        cfg = _read_json(path / "config.json")

        model = tj.get("model") or {}
        if model.get("type") != "BPE" or model.get("byte_fallback"):
            kind = "BPE with byte fallback (SentencePiece-style)" if model.get("byte_fallback") else model.get("type")
            raise TwinquantError(f"unsupported tokenizer model {kind!r} in {path}: only byte-level BPE is supported")
        if (tj.get("normalizer") or {}).get("type") not in (None, "NFC"):  # llama.cpp applies none; NFC is benign
            raise TwinquantError(f"unsupported tokenizer normalizer {tj['normalizer']['type']!r} in {path}")
        pre = _pre_name_from_hf(tj.get("pre_tokenizer"))

        # Token list: BPE vocab, added tokens on top, padded with unused tokens to the embedding size (as
        # llama.cpp's converter does: the GGUF token count must equal token_embd's row count).
        by_id: dict[int, tuple[str, int]] = {i: (t, NORMAL) for t, i in model["vocab"].items()}
        for added in tj.get("added_tokens") or []:
            text = added["content"]
            looks_special = text.startswith(("<|", "<\uff5c")) and text.endswith(("|>", "\uff5c>"))
            by_id[added["id"]] = (text, CONTROL if added.get("special") or looks_special else USER_DEFINED)
        n = max(by_id) + 1
        n_embd = cfg.get("vocab_size")
        if isinstance(n_embd, int):
            if n_embd < n:
                raise TwinquantError(f"tokenizer has {n} tokens but config.json vocab_size is {n_embd}")
            n = n_embd
        entries = [by_id.get(i, (f"[PAD{i}]", UNUSED)) for i in range(n)]
        tokens = [t for t, _ in entries]
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]

        ids = {t: i for i, t in enumerate(tokens)}
        bos = _special_id(tcfg, cfg, "bos", ids)
        eos_ids = _special_ids(tcfg, cfg, "eos", ids)
        pads = _special_ids(tcfg, cfg, "pad", ids)
        add_bos = tcfg.get("add_bos_token")
        if not isinstance(add_bos, bool):
            add_bos = _template_adds_bos(tj.get("post_processor"), tokens[bos] if bos is not None else None)
        return cls(
            tokens=tokens,
            token_types=[k for _, k in entries],
            merges=merges,
            pre=pre,
            bos_id=bos,
            eos_id=eos_ids[0] if eos_ids else None,
            pad_id=pads[0] if pads else None,
            extra_eog_ids=tuple(eos_ids[1:]),
            add_bos=add_bos,
            chat_template=_chat_template(path, tcfg),
        )


def _read_json(p: Path, required: bool = False) -> dict:
    if not p.is_file():
        if required:
            raise TwinquantError(f"{p} not found")
        return {}
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise TwinquantError(f"{p} is not valid JSON: {e}") from None


def _pre_name_from_hf(pt: dict | None) -> str:
    """The llama.cpp pre type whose regex list equals what tokenizer.json's pre_tokenizer does."""
    regexes: list[str] = []
    byte_level = False

    def walk(node: dict) -> None:
        nonlocal byte_level
        kind = node.get("type")
        if kind == "Sequence":
            for sub in node["pretokenizers"]:
                walk(sub)
        elif kind == "Split":
            pattern = node.get("pattern") or {}
            if "Regex" not in pattern or node.get("behavior") != "Isolated" or node.get("invert"):
                raise TwinquantError(f"unsupported tokenizer.json Split pre-tokenizer: {json.dumps(node)}")
            regexes.append(pattern["Regex"])
        elif kind == "Digits":
            regexes.append(r"\p{N}" if node.get("individual_digits") else r"\p{N}+")
        elif kind == "ByteLevel":
            if node.get("add_prefix_space"):
                raise TwinquantError("unsupported tokenizer.json: ByteLevel with add_prefix_space")
            if node.get("use_regex", True):
                regexes.append(_GPT2)  # its built-in regex, equivalent to llama.cpp's gpt-2 one
            byte_level = True
        else:
            raise TwinquantError(f"unsupported tokenizer.json pre-tokenizer {kind!r}")

    walk(pt or {"type": None})
    if not byte_level:
        raise TwinquantError("unsupported tokenizer.json: no ByteLevel pre-tokenizer, so not byte-level BPE")
    found = tuple(regexes)
    for name, spec in PRE_TYPES.items():
        if name != "default" and (found == spec.regexes or found in spec.hf_spellings):
            return name
    raise TwinquantError(
        f"unknown tokenizer.json pre-tokenizer regexes {list(found)!r} "
        f"(supported llama.cpp pre types: {', '.join(SUPPORTED_PRE_TYPES)})"
    )


def _token_content(value) -> str | None:
    if isinstance(value, dict):  # serialized AddedToken
        value = value.get("content")
    return value if isinstance(value, str) else None


def _special_ids(tcfg: dict, cfg: dict, kind: str, ids: dict[str, int]) -> list[int]:
    # tokenizer_config.json's token text wins over config.json's ids, as in llama.cpp's converter.
    text = _token_content(tcfg.get(f"{kind}_token"))
    if text is not None and text in ids:
        return [ids[text]]
    value = cfg.get(f"{kind}_token_id")
    values = value if isinstance(value, list) else [value]
    return [v for v in values if isinstance(v, int) and 0 <= v < len(ids)]


def _special_id(tcfg: dict, cfg: dict, kind: str, ids: dict[str, int]) -> int | None:
    found = _special_ids(tcfg, cfg, kind, ids)
    return found[0] if found else None


def _template_adds_bos(post: dict | None, bos_text: str | None) -> bool | None:
    """Whether a TemplateProcessing post-processor puts BOS first; None when tokenizer.json does not say."""
    if not post:
        return None
    if post.get("type") == "Sequence":
        answers = [_template_adds_bos(p, bos_text) for p in post.get("processors", [])]
        return next((a for a in answers if a is not None), None)
    if post.get("type") != "TemplateProcessing" or not post.get("single"):
        return None
    first = post["single"][0].get("SpecialToken")
    return bool(first) and (bos_text is None or first.get("id") == bos_text)


def _chat_template(path: Path, tcfg: dict) -> str | None:
    jinja = path / "chat_template.jinja"  # where recent transformers versions save it
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    template = tcfg.get("chat_template")
    if isinstance(template, list):  # named templates: llama.cpp's chat_template is the "default" one
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    return template if isinstance(template, str) else None


def load_tokenizer(path) -> Tokenizer:
    """Tokenizer of a Hugging Face model directory or of a .gguf file."""
    path = Path(path)
    if path.is_dir():
        return Tokenizer.from_hf_dir(path)
    if path.is_file() and path.suffix == ".gguf":
        import gguf

        try:
            reader = gguf.GGUFReader(path)
        except Exception as e:
            raise TwinquantError(f"cannot read GGUF file {path}: {e}") from None
        return Tokenizer.from_gguf(reader)
    raise TwinquantError(f"{path} is neither a model directory nor a .gguf file")


def write_tokenizer_metadata(writer, tok: Tokenizer) -> None:
    """Add the tokenizer.ggml.* keys stock llama.cpp needs to load `tok` from the GGUF being written."""
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(tok.pre)
    writer.add_token_list(tok.tokens)
    writer.add_token_types(tok.token_types)
    writer.add_token_merges(tok.merges)
    for add, i in (
        (writer.add_bos_token_id, tok.bos_id),
        (writer.add_eos_token_id, tok.eos_id),
        (writer.add_pad_token_id, tok.pad_id),
        (writer.add_unk_token_id, tok.unk_id),
    ):
        if i is not None:
            add(i)
    writer.add_add_bos_token(tok.add_bos)  # explicit, so llama.cpp needs no per-pre-type default
    if tok.chat_template is not None:
        writer.add_chat_template(tok.chat_template)
