import pytest
import torch
from transformers import AutoTokenizer

from kvq.data import Document, batches, load_documents, select_samples


@pytest.fixture(scope="module")
def tokenizer():
    import tiny_models

    return AutoTokenizer.from_pretrained(tiny_models.tokenizer_dir())


def test_one_long_document_one_sample_is_its_first_seqlen_tokens(tokenizer, shared_data):
    path = shared_data / "wikitext-2-raw-test.txt"
    ds = load_documents(str(path))
    assert len(ds.documents) == 1
    picked = select_samples(ds.documents, tokenizer, samples=1, seqlen=300, seed=1234)
    expected = tokenizer(path.read_text(encoding="utf-8"))["input_ids"][:300]
    assert picked.token_ids == [expected]
    # More samples continue with the next consecutive chunks of the same document.
    picked3 = select_samples(ds.documents, tokenizer, samples=3, seqlen=300, seed=5)
    full = tokenizer(path.read_text(encoding="utf-8"))["input_ids"]
    assert picked3.token_ids == [full[0:300], full[300:600], full[600:900]]


def test_seeded_round_robin_over_documents(tokenizer):
    docs = [Document(text=" ".join(f"w{i}x{j}" for j in range(n))) for i, n in enumerate((3, 40, 10))]
    docs.insert(1, Document(text="   "))  # empty: skipped
    lengths = [len(tokenizer(d.text)["input_ids"]) for d in docs]
    a = select_samples(docs, tokenizer, samples=5, seqlen=16, seed=7)
    b = select_samples(docs, tokenizer, samples=5, seqlen=16, seed=7)
    assert a.token_ids == b.token_ids
    assert a.documents_available == 3
    # Round 0 takes the first chunk of each of the three documents, round 1 second chunks.
    firsts = sorted(len(t) for t in a.token_ids[:3])
    assert firsts == sorted(min(n, 16) for n in (lengths[0], lengths[2], lengths[3]))
    assert all(len(t) <= 16 for t in a.token_ids)
    other_orders = {tuple(map(tuple, select_samples(docs, tokenizer, 3, 16, s).token_ids)) for s in range(10)}
    assert len(other_orders) > 1  # the seed changes the order


def test_asking_for_more_than_exists_uses_everything(tokenizer):
    docs = [Document(text="short one"), Document(text="short two")]
    picked = select_samples(docs, tokenizer, samples=10, seqlen=64, seed=0)
    assert len(picked.token_ids) == 2 and picked.documents_used == 2


def test_chat_documents_use_the_chat_template(tokenizer):
    msgs = ({"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"})
    picked = select_samples([Document(messages=msgs)], tokenizer, 1, 512, 0)
    text = tokenizer.apply_chat_template(list(msgs), tokenize=False)
    assert picked.token_ids == [tokenizer(text, add_special_tokens=False)["input_ids"]]
    assert "<|im_start|>" in tokenizer.decode(picked.token_ids[0])


def test_batches_pad_on_the_right_with_a_mask():
    out = list(batches([[5, 6, 7], [8], [9, 10]], batch_size=2, pad_id=0))
    assert out[0].input_ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert out[0].attention_mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert (out[0].num_samples, out[0].num_tokens) == (2, 4)
    assert out[1].input_ids.tolist() == [[9, 10]] and out[1].attention_mask.dtype == torch.long



def test_a_long_document_is_encoded_only_as_far_as_the_samples_reach(tokenizer, shared_data, monkeypatch):
    """Issue 20: the samples are the full encodings' chunks, taken round-robin in the seeded order (the
    oracle: the tokenizer on each whole text, the documented selection written out), while the text handed
    to the tokenizer stays a bounded prefix of the long document, grown as later chunks are needed."""
    import random

    text = (shared_data / "wikitext-2-raw-test.txt").read_text(encoding="utf-8")  # 1.3 MB, one document
    docs = [Document(text=text), Document(text="a short one"), Document(text=text[:50_000])]
    full = [tokenizer(d.text)["input_ids"] for d in docs]
    order = list(range(len(docs)))
    random.Random(3).shuffle(order)
    expected, chunk = [], 0
    while len(expected) < 40:
        for i in order:
            if full[i][chunk * 128:(chunk + 1) * 128] and len(expected) < 40:
                expected.append(full[i][chunk * 128:(chunk + 1) * 128])
        chunk += 1
    lengths = []
    call = tokenizer.__class__.__call__

    def spy(self, value, *args, **kwargs):
        lengths.append(len(value))
        return call(self, value, *args, **kwargs)

    monkeypatch.setattr(tokenizer.__class__, "__call__", spy)
    picked = select_samples(docs, tokenizer, samples=40, seqlen=128, seed=3)
    monkeypatch.undo()
    assert picked.token_ids == expected
    assert max(lengths) < len(text) // 4  # never the whole 1.3 MB
