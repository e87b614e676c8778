"""Every major chat-template family on a tiny random model (tests/template_families.py):
Llama 3.1, Qwen 2.5, Mistral v0.3, Mistral's strict first template, Gemma 2, Phi-3, SmolLM2.

On each: the template is the real one; every method renders and decodes (the fast path
equals the reference path, plain equals HF ``generate``); user text cannot forge a turn;
the branch slot is where docs/architecture.md says (the system turn, Mistral v0.3's latest
user turn, or the first user turn for templates without a system role); the gate reads the
request in every application shape; and a one-epoch ``acd train`` with its gate fit runs
in seconds and its pack decodes.
"""

from __future__ import annotations

import json

import pytest
from template_families import FAMILIES, Family, build_family, one_torch_thread, train_tiny_pack

from acd_engine import DecodingConfig, Engine, MessagesError
from acd_engine.methods import METHODS
from acd_engine.safety.contexts import CONTEXTS, load_pool, place
from acd_engine.safety.prompts import SAFE_PROMPT, PromptPack

HI = [{"role": "user", "content": "hi"}]
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "a"},
    {"role": "assistant", "content": "b"},
    {"role": "user", "content": "c"},
]

# Each family's rendering of HI and CHAT with the branch slot marked: the slot is where
# the template writes a system message, or the start of the first user turn when it has no
# place for one. Written out by hand from the templates, so a change in where the engine
# puts the slot (or a template file that is not the real one) fails here.
_LLAMA3_HEAD = (
    "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
    "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
)
_LLAMA3_TURN = "<|eot_id|><|start_header_id|>{}<|end_header_id|>\n\n{}"
_CHATML_CHAT = (
    "<|im_start|>system\n{slot}\n\nBe brief.<|im_end|>\n<|im_start|>user\na<|im_end|>\n"
    "<|im_start|>assistant\nb<|im_end|>\n<|im_start|>user\nc<|im_end|>\n<|im_start|>assistant\n"
)
_CHATML_HI = (
    "<|im_start|>system\n{slot}<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
)
SLOTTED: dict[str, tuple[str, str]] = {
    "llama3": (
        _LLAMA3_HEAD
        + "{slot}"
        + _LLAMA3_TURN.format("user", "hi")
        + _LLAMA3_TURN.format("assistant", ""),
        _LLAMA3_HEAD
        + "{slot}\n\nBe brief."
        + "".join(_LLAMA3_TURN.format(r, t) for r, t in (("user", "a"), ("assistant", "b")))
        + "".join(_LLAMA3_TURN.format(r, t) for r, t in (("user", "c"), ("assistant", ""))),
    ),
    "qwen2.5": (_CHATML_HI, _CHATML_CHAT),
    "smollm2": (_CHATML_HI, _CHATML_CHAT),
    "mistral": (
        "<s>[INST] {slot}\n\nhi[/INST]",
        "<s>[INST] a[/INST] b</s>[INST] {slot}\n\nBe brief.\n\nc[/INST]",
    ),
    "mistral-strict": (
        "<s>[INST] {slot}\n\nhi [/INST]",
        "<s>[INST] {slot}\n\nBe brief.\n\na [/INST]b</s>[INST] c [/INST]",
    ),
    "gemma2": (
        "<bos><start_of_turn>user\n{slot}\n\nhi<end_of_turn>\n<start_of_turn>model\n",
        "<bos><start_of_turn>user\n{slot}\n\nBe brief.\n\na<end_of_turn>\n<start_of_turn>model\n"
        "b<end_of_turn>\n<start_of_turn>user\nc<end_of_turn>\n<start_of_turn>model\n",
    ),
    "phi3": (
        "<|system|>\n{slot}<|end|>\n<|user|>\nhi<|end|>\n<|assistant|>\n",
        "<|system|>\n{slot}\n\nBe brief.<|end|>\n<|user|>\na<|end|>\n<|assistant|>\nb<|end|>\n"
        "<|user|>\nc<|end|>\n<|assistant|>\n",
    ),
}
# The untouched template on HI: its default system prompt, if it has one, and no slot.
PLAIN_HI = {
    "llama3": _LLAMA3_HEAD
    + _LLAMA3_TURN.format("user", "hi")
    + _LLAMA3_TURN.format("assistant", ""),
    "qwen2.5": _CHATML_HI.format(
        slot="You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    ),
    "smollm2": _CHATML_HI.format(
        slot="You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    ),
    "mistral": "<s>[INST] hi[/INST]",
    "mistral-strict": "<s>[INST] hi [/INST]",
    "gemma2": "<bos><start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n",
    "phi3": "<|user|>\nhi<|end|>\n<|assistant|>\n",
}


def test_every_family_has_its_expected_renderings():
    assert set(SLOTTED) == set(PLAIN_HI) == set(FAMILIES)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


def _families(flag: str) -> list[str]:
    return [name for name, f in FAMILIES.items() if getattr(f, flag)]


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request) -> Family:
    return FAMILIES[request.param]


@pytest.fixture(scope="module")
def family_dir(family, tmp_path_factory):
    return build_family(family, tmp_path_factory.mktemp(family.name))


@pytest.fixture(scope="module")
def fam(family_dir) -> Engine:
    return Engine(family_dir)


@pytest.fixture(scope="module")
def reference(family_dir) -> Engine:
    return Engine(family_dir, fast_path=False)


def _ids(engine: Engine, text: str) -> list[int]:
    return engine.renderer.encode_template(text)


def _controls(engine: Engine, ids: list[int]) -> list[int]:
    added = set(engine.tokenizer.added_tokens_decoder)
    return [i for i in ids if i in added]


# ---------------------------------------------------------------- the real template
def test_the_template_is_the_real_one_with_its_control_tokens(family, fam):
    assert fam.tokenizer.chat_template == family.template
    text = fam.tokenizer.apply_chat_template(HI, tokenize=False, add_generation_prompt=True)
    assert text == PLAIN_HI[family.name]
    assert fam.render(HI).plain == _ids(fam, text)
    for token in family.specials:  # one control token each, as in the real vocabulary
        assert len(_controls(fam, _ids(fam, token))) == 1
    stops = {fam.tokenizer.convert_tokens_to_ids(t) for t in family.stops}
    assert stops <= fam.eos_token_ids


# ---------------------------------------------------------------- methods
def _config(method: str) -> DecodingConfig:
    extra = (
        {"positive_prompt": "Be safe.", "negative_prompt": "Be evil."} if method == "custom" else {}
    )
    return DecodingConfig(method=method, max_new_tokens=4, **extra)


@pytest.mark.parametrize("messages", [HI, CHAT], ids=["bare", "chat"])
def test_every_method_renders_and_decodes_as_the_reference_path(fam, reference, messages):
    for method in METHODS:
        cfg = _config(method)
        fast = fam.generate(messages, cfg)
        slow = reference.generate(messages, cfg)
        assert fast.token_ids == slow.token_ids, method
        assert fast.method == method and fast.usage.prompt_tokens > 0
        assert fast.finish_reason == ("length" if len(fast.token_ids) == 4 else "stop")
        assert fast.text == fam.tokenizer.decode(fast.token_ids, skip_special_tokens=True)


def test_plain_equals_hf_generate_and_base_puts_the_safe_prompt_in_the_slot(fam, hf_greedy):
    rendered = fam.render(CHAT)
    plain = fam.generate(CHAT, method="plain", max_new_tokens=4)
    assert plain.token_ids == hf_greedy(fam, rendered.plain, 4)
    assert plain.usage.prompt_tokens == len(rendered.plain)
    base = fam.generate(CHAT, method="base", max_new_tokens=1)
    slot = fam.renderer.encode_template(SAFE_PROMPT)
    assert base.usage.prompt_tokens == len(rendered.head) + len(slot) + len(rendered.tail)


# ---------------------------------------------------------------- user text is data
def test_user_text_cannot_forge_a_turn(family, fam):
    forged = family.forged
    conversations = [
        [{"role": "user", "content": forged}],
        [{"role": "system", "content": forged}, {"role": "user", "content": "hi"}],
        [
            {"role": "user", "content": forged},
            {"role": "assistant", "content": forged},
            {"role": "user", "content": forged},
        ],
    ]
    for msgs in conversations:
        benign = [{**m, "content": "hi"} for m in msgs]
        r, b = fam.render(msgs), fam.render(benign)
        for forged_ids, benign_ids in ((r.head, b.head), (r.tail, b.tail), (r.plain, b.plain)):
            assert _controls(fam, forged_ids) == _controls(fam, benign_ids)
        assert r.user_span is not None
        start, stop = r.user_span
        assert _controls(fam, r.plain[start:stop]) == []
    out = fam.generate(forged, method="oid", max_new_tokens=2)
    assert out.usage.completion_tokens <= 2


@pytest.mark.parametrize("family", _families("plain_text_markers"), indirect=True)
def test_a_family_with_turn_markers_as_text_still_protects_its_control_tokens(family, fam):
    # Mistral's first template writes [INST] as ordinary text, so no tokenizer can tell a
    # typed one from the template's; </s> and <s> are control tokens and stay protected.
    r = fam.render(family.forged)
    assert _controls(fam, r.plain) == _controls(fam, fam.render("hi").plain)


# ---------------------------------------------------------------- where the slot is
@pytest.mark.parametrize("which", [0, 1], ids=["bare", "chat"])
def test_the_branch_slot_is_where_the_docs_say(family, fam, which):
    messages = (HI, CHAT)[which]
    head, tail = SLOTTED[family.name][which].split("{slot}")
    rendered = fam.render(messages)
    assert rendered.head == _ids(fam, head)
    assert rendered.tail == _ids(fam, tail)
    # plain is the template untouched; where it has no place for a system message, the
    # caller's own sits where the branch renderings put it (the first user turn)
    if which == 1 and family.slot == "first-user":
        assert rendered.plain == _ids(fam, (head + tail).replace("\n\nBe brief.", "Be brief.", 1))
    elif which == 1:
        text = fam.tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
        assert rendered.plain == _ids(fam, text)


@pytest.mark.parametrize("family", _families("strict_alternation"), indirect=True)
def test_templates_with_strict_roles_refuse_in_house_style(family, fam):
    twice = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(MessagesError, match=r"must be accepted by the chat template.*alternate"):
        fam.generate(twice, max_new_tokens=1)
    with pytest.raises(MessagesError, match="must be accepted by the chat template"):
        fam.generate([{"role": "system", "content": "Be brief."}], max_new_tokens=1)


@pytest.mark.parametrize("family", ["mistral"], indirect=True)
def test_mistral_v03_keeps_the_slot_when_the_conversation_ends_with_a_tool_result(family, fam):
    # its template writes a system message into the last user turn only, so it drops one
    # when the conversation ends with a tool result: the slot then takes the first user turn
    call = {"id": "abcdefghi", "type": "function", "function": {"name": "f", "arguments": {}}}
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": "sunny", "tool_call_id": "abcdefghi"},
    ]
    rendered = fam.render(msgs)
    assert rendered.head == _ids(fam, "<s>[INST] ")
    assert fam.tokenizer.decode(rendered.tail).startswith("\n\nBe brief.\n\na[/INST]")
    assert "Be brief." in fam.tokenizer.decode(rendered.plain)  # plain keeps it there too


@pytest.mark.parametrize("shape", CONTEXTS)
def test_the_gate_reads_the_request_in_every_application_shape(fam, shape):
    prompt = "How do I bake bread at home?"
    placed = place(prompt, shape, load_pool("eval"), seed=0)
    kwargs = {"tools": placed.tools} if placed.tools else {}
    rendered = fam.render(placed.messages, **kwargs)
    assert rendered.user_span is not None
    start, stop = rendered.user_span
    read = fam.tokenizer.decode(rendered.plain[start:stop])
    last = placed.messages[-1]["content"]
    assert last[slice(*placed.request)].strip() in read
    if placed.messages[0]["role"] == "system":  # an app system prompt is context, not request
        assert placed.messages[0]["content"].strip() not in read


# ---------------------------------------------------------------- acd train + gate
@pytest.fixture(scope="module")
def trained(family_dir, tmp_path_factory):
    """One epoch of `acd train` (with its gate fit) on the family's tiny model."""
    return train_tiny_pack(family_dir, tmp_path_factory.mktemp("pack"))


def test_one_epoch_of_acd_train_fits_its_gate(fam, trained):
    out, result = trained
    assert result.exit_code == 0, result.output
    assert "wrote" in result.stdout
    report = json.loads(out.with_name("pack.report.json").read_text())
    assert report["completed"] and [e["epoch"] for e in report["epochs"]] == [0, 1]
    pack = PromptPack.load(out)
    assert pack.trained and pack.gate is not None
    assert list(pack.gate.layers) == report["gate"]["layers"]
    assert all(0 <= layer < fam.model.config.num_hidden_layers for layer in pack.gate.layers)
    assert 0.0 < pack.gate.threshold < 1.0


def test_the_trained_pack_decodes_gated_on_its_model(family_dir, trained):
    out, result = trained
    assert result.exit_code == 0, result.output
    engine = Engine(family_dir, pack=out, require_pack=True)
    for messages in (HI, CHAT):
        answer = engine.generate(messages, method="acd", max_new_tokens=3)
        assert answer.gate_score is not None and 0.0 <= answer.gate_score <= 1.0
        assert answer.gate_flagged == (answer.gate_score >= engine.pack.gate.threshold)
        assert answer.usage.completion_tokens <= 3
