"""Chat and instruction data (ligerzoo/training/formats.py, packed by data.py): the loss sees the
answers only (by labels), examples are packed whole, cut when longer than a row and counted, and
validation data is held out whole and read once by every rank in step."""

import json
import random
from pathlib import Path

import llama_models.llama3.tokenizer
import pytest
import torch

from ligerzoo import load_tokenizer
from ligerzoo.kernels import IGNORE_INDEX
from ligerzoo.tokenizer import ByteTokenizer
from ligerzoo.training.config import DataSection
from ligerzoo.training.data import build_datasets, describe_datasets

LLAMA3_FILE = Path(llama_models.llama3.tokenizer.__file__).parent / "tokenizer.model"
BYTES = ByteTokenizer()
BOS, EOS = BYTES.bos_id, BYTES.eos_id

CONVERSATION = [
    {"role": "system", "content": "Answer in one word."},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris"},
    {"role": "user", "content": "And of Japan?"},
    {"role": "assistant", "content": "Tokyo, of course."},
]


@pytest.fixture(scope="module")
def llama3():
    return load_tokenizer(LLAMA3_FILE)


def write_jsonl(path: Path, records: list) -> Path:
    lines = (json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    path.write_text("".join(lines), encoding="utf-8")
    return path


def build(path: Path, tokenizer=BYTES, seed: int = 0, **settings):
    """(train, val, stats) of build_datasets on `path`."""
    return build_datasets(DataSection(path=str(path), **settings), tokenizer, seed)


def all_rows(data) -> dict[str, torch.Tensor]:
    """Every row of `data`, in order: [R, T] each."""
    return data._rows(list(range(len(data))))


def byte_ids(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def segments(rows: dict[str, torch.Tensor]) -> list[tuple[list[int], list[int]]]:
    """(ids, labels) of every document of every row, in order: a document starts where its position is 0."""
    found = []
    for ids, labels, positions in zip(rows["input_ids"].tolist(), rows["labels"].tolist(),
                                      rows["position_ids"].tolist()):
        begins = [i for i, p in enumerate(positions) if p == 0] + [len(ids)]
        for begin, end in zip(begins, begins[1:]):
            assert positions[begin:end] == list(range(end - begin))  # positions restart per document
            found.append((ids[begin:end], labels[begin:end]))
    return found


def prompt_completion_records(count: int, seed: int = 0) -> list[dict]:
    """Examples of 6 to ~30 bytes, each unique (its number in the prompt)."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 12, (count, 2), generator=generator).tolist()
    return [{"prompt": f"q{i}:" + "p" * a, "completion": "c" * b + "."} for i, (a, b) in enumerate(lengths)]


def prompt_completion_ids(record: dict) -> tuple[list[int], list[int]]:
    """(ids, labels) of a prompt/completion example, by hand: BOS and prompt masked."""
    prompt, answer = [BOS, *byte_ids(record["prompt"])], [*byte_ids(record["completion"]), EOS]
    return prompt + answer, [IGNORE_INDEX] * len(prompt) + answer


# ---------------------------------------------------------------------------------------------
# Masks


def llama3_chat_by_hand(tok, messages) -> tuple[list[int], list[int]]:
    """(ids, labels) of a Llama 3 conversation from its pieces, encoded one by one: each message is
    <|start_header_id|>role<|end_header_id|>\\n\\n content <|eot_id|>; an assistant's content and
    <|eot_id|> are its labels, everything else IGNORE_INDEX."""
    special = tok.special_tokens
    ids, labels = [tok.bos_id], [IGNORE_INDEX]
    for message in messages:
        header = [special["<|start_header_id|>"], *tok.encode(message["role"], bos=False),
                  special["<|end_header_id|>"], *tok.encode("\n\n", bos=False)]
        body = [*tok.encode(message["content"], bos=False), special["<|eot_id|>"]]
        ids += header + body
        answer = message["role"] == "assistant"
        labels += [IGNORE_INDEX] * len(header) + (body if answer else [IGNORE_INDEX] * len(body))
    return ids, labels


def test_llama3_chat_labels_are_exactly_the_assistant_turns_and_their_eot(tmp_path, llama3):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}])
    train, _, _ = build(path, llama3, seq_len=96)
    ids, labels = llama3_chat_by_hand(llama3, CONVERSATION)
    row = all_rows(train)
    assert len(train) == 1 and len(ids) < 96
    assert row["input_ids"][0, :len(ids)].tolist() == ids
    assert row["labels"][0, :len(ids)].tolist() == labels
    answers = llama3.decode([t for t in labels if t != IGNORE_INDEX])
    assert answers == "Paris<|eot_id|>Tokyo, of course.<|eot_id|>"


def test_llama3_chat_with_train_on_prompt_trains_on_all_but_its_first_token(tmp_path, llama3):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}])
    train, _, stats = build(path, llama3, seq_len=96, train_on_prompt=True)
    ids, _ = llama3_chat_by_hand(llama3, CONVERSATION)
    labels = all_rows(train)["labels"][0]
    assert labels[1:len(ids)].tolist() == ids[1:]
    assert (labels[0] == IGNORE_INDEX) and (labels[len(ids):] == IGNORE_INDEX).all()  # nor the padding
    assert stats["train"]["targets"] == len(ids) - 1


def test_prompt_completion_loss_is_on_the_completion_and_eos(tmp_path):
    record = {"prompt": "2+2=", "completion": " 4"}
    train, _, _ = build(write_jsonl(tmp_path / "pc.jsonl", [record]), seq_len=16)
    ids, labels = prompt_completion_ids(record)
    row = all_rows(train)
    assert row["input_ids"][0, :len(ids)].tolist() == ids
    assert row["labels"][0].tolist() == labels + [IGNORE_INDEX] * (16 - len(ids))


@pytest.mark.parametrize("given, prompt", [
    ("Bonjour", "Below is an instruction that describes a task, paired with an input that provides further "
                "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
                "Translate.\n\n### Input:\nBonjour\n\n### Response:"),
    ("", "Below is an instruction that describes a task. Write a response that appropriately completes the "
         "request.\n\n### Instruction:\nTranslate.\n\n### Response:"),
])
def test_alpaca_prompt_is_stanford_alpacas_and_the_output_its_completion(tmp_path, given, prompt):
    record = {"instruction": "Translate.", "input": given, "output": "Hello"}
    train, _, _ = build(write_jsonl(tmp_path / "alpaca.jsonl", [record]), seq_len=512)
    ids, labels = prompt_completion_ids({"prompt": prompt, "completion": "Hello"})
    row = all_rows(train)
    assert row["input_ids"][0, :len(ids)].tolist() == ids
    assert row["labels"][0, :len(ids)].tolist() == labels


def test_train_on_prompt_puts_the_prompt_but_never_the_padding_in_the_loss(tmp_path):
    record = {"prompt": "2+2=", "completion": " 4"}
    train, _, _ = build(write_jsonl(tmp_path / "pc.jsonl", [record]), seq_len=16, train_on_prompt=True)
    ids, _ = prompt_completion_ids(record)
    padding = [IGNORE_INDEX] * (16 - len(ids))
    assert all_rows(train)["labels"][0].tolist() == [IGNORE_INDEX, *ids[1:]] + padding


# ---------------------------------------------------------------------------------------------
# Packing


def test_examples_are_packed_whole_in_file_order_and_padding_is_never_a_target(tmp_path):
    records = prompt_completion_records(60)
    train, _, stats = build(write_jsonl(tmp_path / "pc.jsonl", records), seq_len=48)
    documents = segments(all_rows(train))
    examples = [document for document in documents if document[0][0] == BOS]
    padding = [document for document in documents if document[0][0] != BOS]
    assert examples == [prompt_completion_ids(record) for record in records]  # whole, in order, once each
    assert all(set(ids) == {EOS} and set(labels) == {IGNORE_INDEX} for ids, labels in padding)
    assert stats["train"]["padding"] == sum(len(ids) for ids, _ in padding) > 0
    assert stats["train"]["cut"] == 0


def test_example_longer_than_a_row_is_cut_to_it_and_counted(tmp_path):
    records = [{"prompt": "short", "completion": "one"}, {"prompt": "p" * 30, "completion": "c" * 20},
               {"prompt": "short", "completion": "two"}]
    train, _, stats = build(write_jsonl(tmp_path / "pc.jsonl", records), seq_len=40)
    documents = segments(all_rows(train))
    long_ids, long_labels = prompt_completion_ids(records[1])
    assert (long_ids[:40], long_labels[:40]) in documents  # alone in its row, its first 40 tokens
    assert stats["train"]["cut"] == 1 and stats["train"]["examples"] == 3
    assert "1 example longer than a row cut to it" in describe_datasets(stats)


def test_plain_text_keeps_todays_stream_packing(tmp_path):
    texts = ["a first document", "then a second one, somewhat longer", "third"]
    train, _, _ = build(write_jsonl(tmp_path / "text.jsonl", [{"text": text} for text in texts]), seq_len=8)
    stream = [t for text in texts for t in BYTES.encode(text, bos=True, eos=True)]
    assert train.loss_mask is None
    assert all_rows(train)["input_ids"].flatten().tolist() == stream[:len(stream) // 8 * 8]


# ---------------------------------------------------------------------------------------------
# Validation


def example_numbers(data) -> list[int]:
    """The numbers of the prompt/completion examples in `data`'s rows (the digits after "q")."""
    return [int(bytes(ids[2:ids.index(ord(":"))])) for ids, _ in segments(all_rows(data)) if ids[0] == BOS]


def test_val_fraction_holds_out_the_same_whole_examples_apart_from_training(tmp_path):
    path = write_jsonl(tmp_path / "pc.jsonl", prompt_completion_records(50))
    train, val, stats = build(path, seed=3, seq_len=48, val_fraction=0.1)
    train_again, val_again, _ = build(path, seed=3, seq_len=48, val_fraction=0.1)
    held, trained = example_numbers(val), example_numbers(train)
    assert len(held) == 5 and stats["val"]["examples"] == 5 and stats["train"]["examples"] == 45
    assert sorted(held + trained) == list(range(50)) and held == sorted(held)
    assert example_numbers(val_again) == held and example_numbers(train_again) == trained
    assert example_numbers(build(path, seed=4, seq_len=48, val_fraction=0.1)[1]) != held  # seeded


def test_val_fraction_holds_out_at_least_one_example_and_leaves_one(tmp_path):
    path = write_jsonl(tmp_path / "pc.jsonl", prompt_completion_records(3))
    assert build(path, seq_len=48, val_fraction=0.01)[2]["val"]["examples"] == 1
    with pytest.raises(ValueError, match=r"val_fraction 0.9 of the 3 examples holds out 3, leaving none"):
        build(path, seq_len=48, val_fraction=0.9)


def test_plain_text_validation_keeps_its_last_partial_row(tmp_path):
    train_path = write_jsonl(tmp_path / "train.jsonl", [{"text": "x" * 100}])
    val_path = write_jsonl(tmp_path / "val.jsonl", [{"text": "held out"}])  # 10 tokens, a row is 16
    _, val, stats = build(train_path, seq_len=16, val_path=str(val_path))
    rows = all_rows(val)
    assert len(val) == 1 and rows["input_ids"][0, :10].tolist() == BYTES.encode("held out", eos=True)
    targets = rows["input_ids"][0, 1:10].tolist()
    assert rows["labels"][0].tolist() == [IGNORE_INDEX, *targets] + [IGNORE_INDEX] * 6
    assert stats["val"]["targets"] == 9


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_eval_batches_give_every_row_once_and_each_rank_as_many_batches(tmp_path, world_size):
    text = "".join(random.Random(0).choices("abcdefgh ", k=17 * 32 - 2))  # 17 rows of 32, each its own
    data = build(write_jsonl(tmp_path / "text.jsonl", [{"text": text}]), seq_len=32)[0]
    batch_size, expected = 2, all_rows(data)
    batches = [list(data.eval_batches(batch_size, rank, world_size)) for rank in range(world_size)]
    steps = -(-17 // (world_size * batch_size))  # 9, 5, 3: a filler row on every world size
    assert len(data) == 17 and [len(ranks) for ranks in batches] == [steps] * world_size
    seen = {key: torch.cat([batches[rank][step][key] for step in range(steps) for rank in range(world_size)])
            for key in expected}
    for key in expected:
        assert torch.equal(seen[key][:len(data)], expected[key])  # every row, in order
    assert (seen["labels"][len(data):] == IGNORE_INDEX).all()  # the filler counts for nothing
    assert all(batch["input_ids"].shape == (batch_size, 32) for ranks in batches for batch in ranks)


# ---------------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize("record, message", [
    ({"title": "t", "body": "b"}, r'a record holds "messages" .*; its keys are "title", "body"'),
    ({"prompt": 1, "completion": "x"}, r'"prompt" must be a string, got int'),
    ({"messages": "hello"}, r'"messages" must be a non-empty list'),
    ({"messages": [{"role": "user"}]}, r'messages\[0\] needs a "role" and a "content" string'),
    ({"instruction": "x", "input": 3, "output": "y"}, r'"input" must be a string, got int'),
    ({"messages": [{"role": "user", "content": "hi"}]}, r"the chat template cannot render the conversation"),
])
def test_bad_line_is_named_by_file_and_line(tmp_path, record, message):
    path = write_jsonl(tmp_path / "data.jsonl", [{"text": "fine"}, record])  # bytes: no chat format
    with pytest.raises(ValueError, match=rf"data\.jsonl:2: {message}"):
        build(path, seq_len=16)


class ForgetfulChat(ByteTokenizer):
    """A chat format that, like some reasoning models' templates, drops the content of past answers."""

    def format_chat(self, messages, add_generation_prompt=True):
        last = len(messages) - 1
        text = "".join(f"<{m['role']}>{'' if m['role'] == 'assistant' and i < last else m['content']}\n"
                       for i, m in enumerate(messages))
        return self.encode(text + ("<assistant>" if add_generation_prompt else ""), bos=True)


def test_template_that_renders_earlier_turns_differently_is_refused_naming_the_example(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION[1:3]}, {"messages": CONVERSATION}])
    expected = r"chat\.jsonl:2: the chat template renders messages\[:3\] as ids that do not begin those"
    with pytest.raises(ValueError, match=expected):
        build(path, ForgetfulChat(), seq_len=256)
