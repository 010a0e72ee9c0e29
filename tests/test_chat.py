"""Chat calibration for instruct LMs: {"messages"} records rendered with a chat template, the loss mask on the
assistant's tokens, TLQ's scores from that masked loss, and the CLI/API paths that carry them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import tiny_model, whole_model_gradients

from quantkit.data.calibration import load_calibration, memory_calibration
from quantkit.data.chat import chat_samples, read_chat_template, render_chat
from quantkit.errors import QuantkitError

CHARS = [chr(i) for i in range(32, 127)] + ["\n"]
START, END = "<|im_start|>", "<|im_end|>"
SPECIAL = ["<unk>", START, END]
VOCAB = {t: i for i, t in enumerate(SPECIAL + CHARS)}
# ChatML, as instruct models ship it: a header line per turn, the content, an end token and a newline.
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CONVERSATIONS = [
    [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"},
     {"role": "assistant", "content": "six, I think"}],
    [{"role": "user", "content": "name a colour"}, {"role": "assistant", "content": "red"}],
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}],
    [{"role": "system", "content": "you count"}, {"role": "user", "content": "count to 5"},
     {"role": "assistant", "content": "1 2 3 4 5"}],
]


def chat_tokenizer(template: str | None = CHATML):
    """One token per character, the ChatML markers as single special tokens; `template` as its chat template."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(dict(VOCAB), unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.add_special_tokens([START, END])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token=END)
    fast.chat_template = template
    return fast


def hand_rendered(messages: list[dict]) -> tuple[list[int], list[bool]]:
    """ChatML ids and the assistant mask built piece by piece, without the tokenizer or the template engine:
    the mask covers an assistant turn's content, its end token and the newline after it."""
    ids: list[int] = []
    mask: list[bool] = []
    for message in messages:
        header = [VOCAB[START]] + [VOCAB[c] for c in message["role"] + "\n"]
        body = [VOCAB[c] for c in message["content"]] + [VOCAB[END], VOCAB["\n"]]
        ids += header + body
        mask += [False] * len(header) + [message["role"] == "assistant"] * len(body)
    return ids, mask


def write_chats(path: Path, conversations=CONVERSATIONS) -> Path:
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in conversations))
    return path


def test_rendered_ids_and_mask_match_hand_built_chatml() -> None:
    tok = chat_tokenizer()
    for messages in CONVERSATIONS:
        sample = render_chat({"messages": messages}, tok)
        ids, mask = hand_rendered(messages)
        assert sample["input_ids"][0].tolist() == ids
        assert sample["input_ids"][0].tolist() == list(tok.apply_chat_template(messages, tokenize=True, return_dict=False))
        assert sample["loss_mask"][0].tolist() == mask
        assert set(sample) == {"input_ids", "loss_mask"}


def test_template_file_replaces_a_missing_template(tmp_path) -> None:
    path = write_chats(tmp_path / "chats.jsonl")
    bare = chat_tokenizer(template=None)
    with pytest.raises(QuantkitError, match="no chat template.*--chat-template FILE"):
        chat_samples(path, bare, 2)
    (tmp_path / "chatml.jinja").write_text(CHATML)
    samples = load_calibration(str(path), None, False, 4, 512, tokenizer_or_processor=bare,
                               chat_template=tmp_path / "chatml.jinja")
    for sample, messages in zip(samples, CONVERSATIONS):  # nsamples == records: all, in file order
        ids, mask = hand_rendered(messages)
        assert sample["input_ids"][0].tolist() == ids and sample["loss_mask"][0].tolist() == mask
    # a given template wins over the tokenizer's own
    (tmp_path / "plain.jinja").write_text("{% for m in messages %}{{ m['content'] }}\n{% endfor %}")
    plain = chat_samples(path, chat_tokenizer(), 1, chat_template=read_chat_template(tmp_path / "plain.jinja"))
    assert START not in chat_tokenizer().decode(plain[0]["input_ids"][0])


def test_draws_are_seeded_and_truncation_keeps_the_mask(tmp_path) -> None:
    path = write_chats(tmp_path / "chats.jsonl")
    tok = chat_tokenizer()
    first = chat_samples(path, tok, 2, seed=3)
    again = chat_samples(path, tok, 2, seed=3)
    assert [s["input_ids"].tolist() for s in first] == [s["input_ids"].tolist() for s in again]
    assert first[0]["input_ids"].tolist() != first[1]["input_ids"].tolist()
    cut = chat_samples(write_chats(tmp_path / "three.jsonl", CONVERSATIONS[:3]), tok, 3, max_length=45)
    for sample, messages in zip(cut, CONVERSATIONS):
        ids, mask = hand_rendered(messages)
        assert sample["input_ids"][0].tolist() == ids[:45] and sample["loss_mask"][0].tolist() == mask[:45]
    assert len(hand_rendered(CONVERSATIONS[0])[0]) > 45  # the first one was cut, inside its second user turn
    with pytest.raises(QuantkitError, match=r"chats.jsonl:4: --seqlen 45 cuts every assistant token"):
        chat_samples(path, tok, 4, max_length=45)  # conversation 4's answer starts at token 48
    with pytest.raises(QuantkitError, match="holds 4 conversations, fewer than --nsamples 5"):
        chat_samples(path, tok, 5)


def test_bad_records_and_options(tmp_path) -> None:
    tok = chat_tokenizer()
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"messages": CONVERSATIONS[1]}) + "\n" + json.dumps({"text": "x"}) + "\n")
    with pytest.raises(QuantkitError, match=r"bad.jsonl:2: no 'messages' list"):
        chat_samples(path, tok, 1)
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(QuantkitError, match=r"bad.jsonl:1: no assistant turn"):
        chat_samples(path, tok, 1)
    path.write_text(json.dumps({"messages": "hi"}) + "\n")
    with pytest.raises(QuantkitError, match=r"bad.jsonl:1: 'messages' must be a non-empty list"):
        chat_samples(path, tok, 1)
    (tmp_path / "broken.jinja").write_text("{% for m in messages %}{{ m['content'] }}")
    with pytest.raises(QuantkitError, match=r"broken.jinja is not a valid Jinja template"):
        read_chat_template(tmp_path / "broken.jinja")
    with pytest.raises(QuantkitError, match=r"missing.jinja not found"):
        read_chat_template(tmp_path / "missing.jinja")
    text = tmp_path / "t.txt"
    text.write_text("plain text " * 50)
    (tmp_path / "ok.jinja").write_text(CHATML)
    with pytest.raises(QuantkitError, match="--chat-template renders chat records"):
        load_calibration(str(text), None, False, 1, 8, tokenizer_or_processor=tok, chat_template=tmp_path / "ok.jinja")
    chats = write_chats(tmp_path / "chats.jsonl")
    with pytest.raises(QuantkitError, match="--part heldout splits text files"):
        load_calibration(str(chats), None, False, 1, 64, part="heldout", tokenizer_or_processor=tok)
    raising = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(QuantkitError, match="chats.jsonl:1: the chat template refused the conversation: roles must alternate"):
        chat_samples(chats, chat_tokenizer(raising), 4)
    # a template failing with another error (jinja's sandbox refusing a huge range, a division by zero) was a traceback
    for failing, error in (("{% for i in range(10**7) %}{% endfor %}", "OverflowError: Range too big"),
                           ("{{ 1 // 0 }}", "ZeroDivisionError")):
        with pytest.raises(QuantkitError, match=f"chats.jsonl:1: the chat template failed on the conversation \\({error}"):
            chat_samples(chats, chat_tokenizer(failing + CHATML), 4)
    # a record that is both a text and a chat, or a chat carrying an image part: which one was used? refused
    path.write_text(json.dumps({"messages": CONVERSATIONS[1], "text": "another text"}) + "\n")
    with pytest.raises(QuantkitError, match=r"bad.jsonl:1: holds both 'text' and 'messages'"):
        chat_samples(path, tok, 1)
    pictured = [{**m, "content": [{"type": "image", "image": "a.png"}, {"type": "text", "text": m["content"]}]}
                if m["role"] == "user" else m for m in CONVERSATIONS[1]]
    path.write_text(json.dumps({"messages": pictured}) + "\n")
    with pytest.raises(QuantkitError, match=r"bad.jsonl:1: a message holds a part that is not text"):
        chat_samples(path, tok, 1)
    as_parts = [{**m, "content": [{"type": "text", "text": m["content"]}]} for m in CONVERSATIONS[1]]
    assert render_chat({"messages": as_parts}, tok)["input_ids"].numel() > 0  # text parts stay a text chat


def test_in_memory_records_and_dataset_match_the_file(tmp_path) -> None:
    datasets = pytest.importorskip("datasets")
    tok = chat_tokenizer()
    from_file = chat_samples(write_chats(tmp_path / "chats.jsonl"), tok, 3, seed=1)
    records = [{"messages": m} for m in CONVERSATIONS]
    for data in (records, datasets.Dataset.from_list(records)):
        samples = memory_calibration(data, tok, 3, 512, seed=1)
        assert [s["input_ids"].tolist() for s in samples] == [s["input_ids"].tolist() for s in from_file]
        assert [s["loss_mask"].tolist() for s in samples] == [s["loss_mask"].tolist() for s in from_file]
    with pytest.raises(QuantkitError, match="--chat-template renders chat records"):
        (tmp_path / "ok.jinja").write_text(CHATML)
        memory_calibration(["some text"] * 10, tok, 1, 4, chat_template=tmp_path / "ok.jinja")
    both = datasets.Dataset.from_list([{**r, "text": "x"} for r in records])
    with pytest.raises(QuantkitError, match="both a 'text' and a 'messages' column"):
        memory_calibration(both, tok, 3, 512, seed=1)


def tiny_llama(layers: int = 2):
    return tiny_model("llama", seed=0, vocab_size=len(VOCAB), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=128).eval()


def reference_scores(model, ids: list[int], mask: list[bool]) -> list[torch.Tensor]:
    """||dL/dy_l||^2 per token at every decoder layer output, L the mean cross-entropy of the assistant tokens
    (targets t with mask[t], predicted at t - 1), from one whole-model forward and backward."""
    sample = {"input_ids": torch.tensor([ids]), "loss_mask": torch.tensor([mask])}
    return [g.pow(2).sum(-1) for g in whole_model_gradients(model, model.model.layers, sample)]


def test_tlq_scores_are_the_assistant_loss_gradients() -> None:
    from quantkit.importance import tlq_token_weights

    model = tiny_llama()
    tok = chat_tokenizer()
    samples = [render_chat({"messages": m}, tok) for m in CONVERSATIONS]
    importance = tlq_token_weights(model, samples, progress=False, lam=0.1, power=1.0)
    for i, messages in enumerate(CONVERSATIONS):
        ids, mask = hand_rendered(messages)
        for layer, ref in enumerate(reference_scores(model, ids, mask)):
            got = importance.scores[layer][i]
            assert float((got - ref).norm() / ref.norm()) < 1e-5, (i, layer)
            weights = 0.9 * ref / ref.mean() + 0.1
            assert torch.allclose(importance.weights[layer][i].reshape(-1), weights, rtol=1e-4, atol=1e-6)
        # the loss of the whole sequence would give other scores: the mask is what reached the gradients
        unmasked = reference_scores(model, ids, [True] * len(ids))
        assert float((importance.scores[0][i] - unmasked[0]).norm() / unmasked[0].norm()) > 1e-2


@pytest.fixture()
def chat_model_dir(tmp_path) -> Path:
    out = tmp_path / "model"
    tiny_llama().save_pretrained(out)
    chat_tokenizer(template=None).save_pretrained(out)
    return out


def test_importance_cli_saves_the_assistant_mask(chat_model_dir, tmp_path) -> None:
    from quantkit.cli import main
    from quantkit.importance import load_calibration_set

    chats = write_chats(tmp_path / "chats.jsonl")
    args = ["importance", str(chat_model_dir), "--calib", str(chats), "--nsamples", "4", "--seqlen", "128"]
    result = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "set")])
    assert result.exit_code == 2
    assert result.output.count("\n") == 1 and "no chat template" in result.output and "--chat-template FILE" in result.output
    assert not (tmp_path / "set").exists()
    (tmp_path / "chatml.jinja").write_text(CHATML)
    result = CliRunner().invoke(main, [*args, "--chat-template", str(tmp_path / "chatml.jinja"), "-o", str(tmp_path / "set"), "--json"])
    assert result.exit_code == 0, result.output
    samples, _ = load_calibration_set(tmp_path / "set", str(chat_model_dir), tiny_llama())
    for sample, messages in zip(samples, CONVERSATIONS):
        ids, mask = hand_rendered(messages)
        assert sample["input_ids"][0].tolist() == ids and sample["loss_mask"][0].tolist() == mask


@pytest.mark.parametrize("via", ["cli", "api"])
def test_calibrate_feeds_chat_samples_to_tlq(chat_model_dir, tmp_path, monkeypatch, via) -> None:
    import quantkit
    import quantkit.importance
    from quantkit.cli import main

    seen: list[dict] = []
    real = quantkit.importance.tlq_token_weights

    def spy(model, samples, **kwargs):
        seen.extend(samples)
        return real(model, samples, **kwargs)

    monkeypatch.setattr(quantkit.importance, "tlq_token_weights", spy)
    (tmp_path / "chatml.jinja").write_text(CHATML)
    chats = write_chats(tmp_path / "chats.jsonl")
    out = tmp_path / "out"
    options = dict(bits=4, group_size=16)
    if via == "cli":
        result = CliRunner().invoke(main, [
            "calibrate", str(chat_model_dir), "--method", "tlq", "--bits", "4", "--group-size", "16", "--calib",
            str(chats), "--chat-template", str(tmp_path / "chatml.jinja"), "--nsamples", "4", "--seqlen", "128",
            "-o", str(out), "--json"])
        assert result.exit_code == 0, result.output
    else:
        quantkit.quantize(str(chat_model_dir), data=[{"messages": m} for m in CONVERSATIONS], method="tlq",
                          nsamples=4, seqlen=128, chat_template=tmp_path / "chatml.jinja", output_dir=out,
                          progress=False, **options)
    assert (out / "quantkit.json").is_file()
    assert len(seen) == 4
    for sample, messages in zip(seen, CONVERSATIONS):
        ids, mask = hand_rendered(messages)
        assert sample["input_ids"][0].tolist() == ids and sample["loss_mask"][0].tolist() == mask


def test_calibrate_refuses_a_template_for_text_data_before_loading(chat_model_dir, tmp_path, monkeypatch) -> None:
    import quantkit.models
    from quantkit.cli import main

    monkeypatch.setattr(quantkit.models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    (tmp_path / "t.txt").write_text("abc " * 400)
    (tmp_path / "chatml.jinja").write_text(CHATML)
    result = CliRunner().invoke(main, ["calibrate", str(chat_model_dir), "--calib", str(tmp_path / "t.txt"),
                                       "--chat-template", str(tmp_path / "chatml.jinja"), "--seqlen", "64", "-o", str(tmp_path / "o")])
    assert result.exit_code == 2 and "--chat-template renders chat records" in result.output
    chats = write_chats(tmp_path / "chats.jsonl")
    result = CliRunner().invoke(main, ["calibrate", str(chat_model_dir), "--calib", str(chats), "--nsamples", "4",
                                       "--seqlen", "64", "-o", str(tmp_path / "o")])
    assert result.exit_code == 2 and "no chat template" in result.output
    result = CliRunner().invoke(main, ["calibrate", str(chat_model_dir), "--calib", str(chats), "--part", "train",
                                       "--chat-template", str(tmp_path / "chatml.jinja"), "--seqlen", "64",
                                       "-o", str(tmp_path / "o")])
    assert result.exit_code == 2 and "--part train splits text files" in result.output
    assert not (tmp_path / "o").exists()
