"""ChatGLM-6B's two tokenizer layouts, on small ice_text.model files built here as the releases lay them out.

The first release (vocabulary 150,528) offsets every sentencepiece id by 20000 image tokens and has
no tokenizer_config.json field for it; the "slim" release of April 2023 (vocabulary 130,528) says
`"num_image_tokens": 0` there. In both, <unk> <s> </s> <pad> <n> are pieces 0-4, and [MASK]
[gMASK] [sMASK] <unused_0> <sop> <eop> <ENC> <dBLOCK> are control pieces appended after the
trained pieces, then <|tab|> and <|blank_2..80|> as user-defined ones; tokenizer_config.json is
each release's own (its eos_token is </s> in the first, <eop> in the slim one). The golden ids are
the fixture model's own sentencepiece ids of each string as tokenization_chatglm.py preprocesses
it, with that preprocessing written out by hand below (newline -> <n>, tab -> <|tab|>, runs of
2-80 spaces -> <|blank_N|>, longest first), plus the offset.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import openglm
from openglm.cli import app
from openglm.data.documents import bundled_corpus_paths
from openglm.io.checkpoint import CheckpointError
from openglm.io.convert import ChatGLMTokenizer, convert
from openglm.io.convert.chatglm import config_from_chatglm
from openglm.model import GLM

CONTROL = ["[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>"]
WHITESPACE = ["<|tab|>", *(f"<|blank_{n}|>" for n in range(2, 81))]

# (text, the text as the reference hands it to sentencepiece, the text decoding gives back)
GOLDEN = [
    ("Emma Woodhouse, handsome, clever, and rich", "Emma Woodhouse, handsome, clever, and rich", None),
    ("话说天下大势，分久必合", "话说天下大势，分久必合", "话说天下大势,分久必合"),  # NFKC: full-width comma
    ("first line\nsecond line\n\nthird", "first line<n>second line<n><n>third", None),
    ("name\tvalue\t\tend", "name<|tab|>value<|tab|><|tab|>end", None),
    ("a  b   c    d", "a<|blank_2|>b<|blank_3|>c<|blank_4|>d", None),
    ("def f():\n    return 1", "def f():<n><|blank_4|>return 1", None),
    ("x" + " " * 85 + "y", "x<|blank_80|><|blank_5|>y", None),
    ("x" + " " * 81 + "y", "x<|blank_80|> y", None),
    ("x" + " " * 160 + "y", "x<|blank_80|><|blank_80|>y", None),
    ("I \u2764\ufe0f llamas \U0001f999!", "I \u2764\ufe0f llamas \U0001f999!", None),
    ("混合 mixed\t文本\n  end", "混合 mixed<|tab|>文本<n><|blank_2|>end", None),
]


# Special-token text in a prompt: (text, what the reference encodes in the first release, in the slim
# one when that differs). A str is text sentencepiece encodes on its own (already preprocessed), a
# 1-tuple one special token's text. Derived by hand from transformers 4.27's PreTrainedTokenizer.tokenize
# (its trie splits off the registered special tokens, tokenizer_config.json's bos/eos/unk/pad/mask_token,
# and strips the whitespace on both sides of each; every other piece goes to _tokenize, which encodes it
# with the dummy prefix) and each release's tokenization_chatglm.py; then checked once, outside this
# suite, by running transformers 4.27.1 with THUDM/chatglm-6b's tokenization_chatglm.py (of 2023-04-06
# for the first release, of 2023-05-08 for the slim one) on this fixture, which gave these ids.
SPECIAL_GOLDEN = [
    ("Hello [MASK] world", ["Hello", ("[MASK]",), "world"], None),
    ("[gMASK]x", ["[gMASK]x"], None),  # a control piece: sentencepiece never emits it for text
    ("a <sop> b", ["a", ("<sop>",), "b"], None),
    ("  [MASK]  ", [("[MASK]",)], None),
    ("问题[MASK]答案", ["问题", ("[MASK]",), "答案"], None),
    ("Emma [gMASK]", ["Emma [gMASK]"], None),
    ("[MASK] is", [("[MASK]",), "is"], None),
    ("a [MASK]", ["a", ("[MASK]",)], None),
    ("x</s>y", ["x", ("</s>",), "y"], ["x</s>y"]),  # eos_token: </s> in the first release, <eop> in the slim one
    ("<eop> z", ["<eop> z"], [("<eop>",), "z"]),
    ("<unk> a", [("<unk>",), "a"], None),
    ("b <pad>", ["b", ("<pad>",)], None),
    ("[sMASK] q", ["[sMASK] q"], None),
    ("a\n[MASK]\tb", ["a", ("[MASK]",), "b"], None),  # newlines and tabs are whitespace too
    ("a [MASK] b [MASK]", ["a", ("[MASK]",), "b", ("[MASK]",)], None),
    ("x  <sop>  y", ["x", ("<sop>",), "y"], None),
    ("[MASK][MASK]", [("[MASK]",), ("[MASK]",)], None),
    ("混合 [gMASK] 文本", ["混合 [gMASK] 文本"], None),
    ("Hello\n\n[MASK]", ["Hello", ("[MASK]",)], None),
    ("a  b [MASK]\n\nc\td", ["a<|blank_2|>b", ("[MASK]",), "c<|tab|>d"], None),
]


def build_ice_text(folder: Path) -> Path:
    """A sentencepiece model trained on the bundled English and Chinese text, with ChatGLM's
    special pieces appended at its end as the releases have them."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as model_pb2

    paths = bundled_corpus_paths()
    lines = []
    for language in ("en", "zh"):
        path = next(p for p in paths if p.parent.name == language)
        lines += [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()][:400]
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buffer, vocab_size=2000, pad_id=3, user_defined_symbols=["<n>"],
        character_coverage=0.98, byte_fallback=True, minloglevel=2,
    )  # fmt: skip
    proto = model_pb2.ModelProto()
    proto.ParseFromString(buffer.getvalue())
    for text in CONTROL:
        proto.pieces.add(piece=text, score=0.0, type=model_pb2.ModelProto.SentencePiece.CONTROL)
    for text in WHITESPACE:
        proto.pieces.add(piece=text, score=0.0, type=model_pb2.ModelProto.SentencePiece.USER_DEFINED)
    path = folder / "ice_text.model"
    path.write_bytes(proto.SerializeToString())
    return path


def sp_ids(model: Path, text: str) -> list[int]:
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(model)).encode(text)


def piece_id(model: Path, text: str) -> int:
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(model)).piece_to_id(text)


# tokenizer_config.json of each release (THUDM/chatglm-6b before and after 2023-04-06), less auto_map
TOKENIZER_CONFIG = {
    "name_or_path": "THUDM/chatglm-6b", "bos_token": "<sop>", "eop_token": "<eop>", "eos_token": "</s>",
    "gmask_token": "[gMASK]", "mask_token": "[MASK]", "pad_token": "<pad>", "unk_token": "<unk>",
    "remove_space": False, "do_lower_case": False, "tokenizer_class": "ChatGLMTokenizer",
}  # fmt: skip
SLIM_TOKENIZER_CONFIG = {
    **{k: v for k, v in TOKENIZER_CONFIG.items() if k != "eop_token"}, "eos_token": "<eop>", "end_token": "</s>",
    "num_image_tokens": 0,
}  # fmt: skip


def write_release(folder: Path, ice_text: Path, slim: bool) -> dict:
    """A ChatGLM-6B directory of either release: config.json (token ids, vocabulary padded past
    the pieces), the release's tokenizer_config.json, small random fp16 weights."""
    import sentencepiece as spm

    folder.mkdir(parents=True)
    (folder / "ice_text.model").write_bytes(ice_text.read_bytes())
    sp = spm.SentencePieceProcessor(model_file=str(ice_text))
    offset = 0 if slim else 20000
    first = sp.piece_to_id("[MASK]")  # the first appended piece: 130000 in the releases
    config = {
        "model_type": "chatglm", "architectures": ["ChatGLMModel"], "hidden_size": 32, "inner_hidden_size": 64,
        "num_layers": 2, "num_attention_heads": 4, "layernorm_epsilon": 1e-5, "max_sequence_length": 128,
        "position_encoding_2d": True, "vocab_size": offset + sp.get_piece_size() + 40,
        "mask_token_id": offset + first, "gmask_token_id": offset + first + 1, "bos_token_id": offset + first + 4,
        "eos_token_id": offset + first + 5, "pad_token_id": offset + 3,
    }  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "tokenizer_config.json").write_text(json.dumps(SLIM_TOKENIZER_CONFIG if slim else TOKENIZER_CONFIG))
    torch.manual_seed(0)
    model = GLM(config_from_chatglm(config, folder / "config.json"))
    weights = {
        ("" if name == "lm_head.weight" else "transformer.") + name: t.detach().half() for name, t in model.state_dict().items()
    }
    torch.save(weights, folder / "pytorch_model.bin")
    return config


@pytest.fixture(scope="module")
def ice_text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_ice_text(tmp_path_factory.mktemp("sp"))


@pytest.fixture(scope="module", params=["original", "slim"])
def release(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, ice_text: Path) -> tuple[Path, dict, int]:
    slim = request.param == "slim"
    folder = tmp_path_factory.mktemp(request.param) / "chatglm-6b"
    return folder, write_release(folder, ice_text, slim), 0 if slim else 20000


@pytest.mark.parametrize(("text", "preprocessed", "decoded"), GOLDEN)
def test_both_releases_encode_and_decode_as_the_reference(
    release, ice_text: Path, text: str, preprocessed: str, decoded: str | None
) -> None:
    folder, _, offset = release
    _, tokenizer = openglm.load(folder)
    assert isinstance(tokenizer, ChatGLMTokenizer) and tokenizer.num_image_tokens == offset
    ids = tokenizer.encode(text)
    assert ids == [offset + i for i in sp_ids(ice_text, preprocessed)]
    assert tokenizer.decode(ids) == (text if decoded is None else decoded)


def test_special_tokens_come_from_the_pieces_and_prompts_end_in_gmask_sop(release, ice_text: Path) -> None:
    folder, config, offset = release
    model, tokenizer = openglm.load(folder)
    tokens = tokenizer.special_tokens
    assert (tokens.mask, tokens.gmask, tokens.sop, tokens.eop) == (
        config["mask_token_id"], config["gmask_token_id"], config["bos_token_id"], config["eos_token_id"]
    )  # fmt: skip
    assert tokens.mask == offset + piece_id(ice_text, "[MASK]")
    # as in the reference, typed [gMASK] is text (a control piece) and [MASK] a token with the space after it stripped
    assert tokenizer.encode("Emma [gMASK]") == [offset + i for i in sp_ids(ice_text, "Emma [gMASK]")]
    assert tokenizer.encode("[MASK] is") == [config["mask_token_id"], *(offset + i for i in sp_ids(ice_text, "is"))]
    assert tokenizer.decode([1, 2, *tokenizer.encode("Emma")]) == "Emma"  # image tokens, or <s> </s>: no text
    # a prompt with no blank is text, [gMASK], <sop>, as both releases' build_inputs_with_special_tokens make it
    seen: list[list[int]] = []
    handle = model.register_forward_pre_hook(
        lambda _, args, kwargs: seen.append((args[0] if args else kwargs["input_ids"])[0].tolist()), with_kwargs=True
    )
    try:
        openglm.generate(model, tokenizer, "Emma Woodhouse", max_new_tokens=1)
    finally:
        handle.remove()
    assert seen[0] == [offset + i for i in sp_ids(ice_text, "Emma Woodhouse")] + [
        config["gmask_token_id"],
        config["bos_token_id"],
    ]


@pytest.mark.parametrize(("text", "parts", "slim_parts"), SPECIAL_GOLDEN)
def test_special_token_text_is_split_and_stripped_as_the_reference(
    release, ice_text: Path, text: str, parts: list, slim_parts: list | None
) -> None:
    folder, _, offset = release
    _, tokenizer = openglm.load(folder)
    expected: list[int] = []
    for part in slim_parts if offset == 0 and slim_parts is not None else parts:
        if isinstance(part, tuple):
            expected.append(offset + piece_id(ice_text, part[0]))
        else:
            expected += [offset + i for i in sp_ids(ice_text, part)]
    assert tokenizer.encode(text) == expected


@pytest.mark.parametrize(
    ("text", "original", "slim", "blank"),
    [
        ("Emma Woodhouse", ["[gMASK]"], ["[gMASK]"], "[gMASK]"),
        ("Emma [MASK] Woodhouse", ["</s>"], ["[gMASK]"], "[MASK]"),
        ("Emma [MASK]", [], ["[gMASK]"], "[MASK]"),
    ],
)
def test_generation_appends_and_fills_as_each_release(
    release, ice_text: Path, text: str, original: list[str], slim: list[str], blank: str
) -> None:
    """build_inputs_with_special_tokens: the first release appends [gMASK] only without a [MASK],
    and its end token </s> when the prompt does not end in a mask; the slim one always appends
    [gMASK]. <sop> follows, and Part B takes the position of the blank the model code picks (the
    [gMASK] when there is one in the slim release, else the first [MASK])."""
    folder, _, offset = release
    model, tokenizer = openglm.load(folder)
    ids = tokenizer.encode(text)
    appended = [offset + piece_id(ice_text, t) for t in (slim if offset == 0 else original)]
    seen: list[tuple[list[int], list[int], list[int]]] = []
    handle = model.register_forward_pre_hook(
        lambda _, args, kwargs: seen.append(tuple(a[0].tolist() for a in args[:3])), with_kwargs=True
    )
    try:
        openglm.generate(model, tokenizer, text, max_new_tokens=2)
    finally:
        handle.remove()
    tokens, positions, blocks = seen[0]
    assert tokens == [*ids, *appended, offset + piece_id(ice_text, "<sop>")]
    filled = (ids + appended).index(offset + piece_id(ice_text, "[gMASK]" if offset == 0 else blank))
    assert positions[-1] == filled and blocks[-1] == 1 and positions[:-1] == list(range(len(tokens) - 1))


def test_converted_checkpoint_keeps_the_offset(release, tmp_path: Path) -> None:
    folder, _, offset = release
    out = convert(folder, tmp_path / "openglm")
    _, tokenizer = openglm.load(out)
    _, direct = openglm.load(folder)
    assert isinstance(tokenizer, ChatGLMTokenizer) and tokenizer.num_image_tokens == offset
    text = GOLDEN[-1][0]
    assert tokenizer.encode(text) == direct.encode(text) and tokenizer.fingerprint == direct.fingerprint
    back = convert(out, tmp_path / "hf", None, "chatglm-hf")
    assert (back / "tokenizer_config.json").is_file() == (folder / "tokenizer_config.json").is_file()


def test_a_mismatched_offset_is_named(tmp_path: Path, ice_text: Path) -> None:
    slim = tmp_path / "slim"
    write_release(slim, ice_text, slim=True)
    (slim / "tokenizer_config.json").unlink()  # the default of 20000 no longer fits config.json
    first = piece_id(ice_text, "[MASK]")
    with pytest.raises(
        CheckpointError,
        match=rf"\[MASK\] is piece {first}, so id {20000 + first} with num_image_tokens 20000 \(the default\), but the model config says {first}",
    ):
        openglm.load(slim)
    (slim / "tokenizer_config.json").write_text("{not json")
    result = CliRunner().invoke(app, ["generate", "--model", str(slim), "hello"])
    assert result.exit_code == 2 and "tokenizer_config.json: not valid JSON" in result.output and "Traceback" not in result.output
    (slim / "tokenizer_config.json").write_text(json.dumps({"num_image_tokens": -5}))
    with pytest.raises(CheckpointError, match=r"tokenizer_config\.json: num_image_tokens must be a non-negative integer, got -5"):
        openglm.load(slim)
