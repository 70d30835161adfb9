import math
import sys
import types

import pytest
import torch
import torch.nn.functional as F

import mor_lab
from mor_lab.train import (OFFLINE_CORPORA, CorpusError, TokenBatches, is_validation, load_corpus,
                           module_docstrings, perplexity, strided_windows, tokenize)

MB = 1_000_000


class ByteTokenizer:
    """UTF-8 bytes as tokens: matches the tiny random models' 256-token vocabulary."""

    def encode(self, text):
        return list(text.encode("utf-8"))


# --- corpora ---------------------------------------------------------------------------------------

def test_pydoc_split_is_deterministic_disjoint_and_complete():
    from pydoc_data.topics import topics
    corpus = load_corpus("pydoc")
    assert 0.4 * MB < len(corpus.train) + len(corpus.validation) < 0.6 * MB
    assert corpus.train and corpus.validation and corpus.name == "pydoc"
    assert load_corpus("pydoc") == corpus
    for key, text in topics.items():  # each topic is in exactly the split its key's hash names
        home, other = (corpus.validation, corpus.train) if is_validation(key) else (corpus.train, corpus.validation)
        assert text.strip() in home and text.strip() not in other, key


def test_stdlib_docs_is_documentation_prose():
    corpus = load_corpus("stdlib_docs")
    size = len(corpus.train) + len(corpus.validation)
    assert 1.0 * MB < size < 3.0 * MB, size
    assert len(corpus.validation) > 0.03 * size
    assert "Return" in corpus.train and "def " not in corpus.train[:10_000]


def test_stdlib_code_full_and_capped():
    corpus = load_corpus("stdlib_code")
    assert len(corpus.train) + len(corpus.validation) > 10 * MB
    capped = load_corpus("stdlib_code", max_chars=300_000)
    assert len(capped.train) + len(capped.validation) <= 300_000
    assert capped.validation and "def " in capped.train
    assert load_corpus("stdlib_code", max_chars=300_000) == capped


def test_module_docstrings_parses_without_importing(tmp_path):
    source = tmp_path / "mod.py"
    source.write_text('"""Module doc."""\nraise SystemExit("imported!")\n'
                      'if True:\n    class A:\n        """Class doc."""\n'
                      '        def f(self):\n            """Method doc."""\n            x = "not a doc"\n')
    assert module_docstrings(str(source)).split("\n\n") == ["Module doc.", "Class doc.", "Method doc."]


def test_unknown_corpus_lists_the_offline_ones():
    with pytest.raises(ValueError, match="unknown corpus") as error:
        load_corpus("no-such-corpus")
    assert all(name in str(error.value) for name in OFFLINE_CORPORA)


def test_local_file_and_directory(tmp_path):
    paragraphs = [f"Paragraph {i}: " + " ".join(["lorem ipsum"] * 20) for i in range(400)]
    (tmp_path / "notes.txt").write_text("\n\n".join(paragraphs))
    corpus = load_corpus(tmp_path / "notes.txt")
    assert corpus.train and corpus.validation  # a single file is split by blocks of paragraphs
    found = corpus.train.split("\n\n") + corpus.validation.split("\n\n")
    assert sorted(found) == sorted(paragraphs)

    (tmp_path / "more.md").write_text("# Markdown counts")
    (tmp_path / "code.py").write_text("python does not")
    directory = load_corpus(tmp_path)
    text = directory.train + directory.validation
    assert "Markdown counts" in text and "Paragraph 399" in text and "python does not" not in text


def test_hf_corpus_without_datasets_says_what_to_do(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails as if not installed
    with pytest.raises(CorpusError, match="pip install datasets"):
        load_corpus("hf:wikitext:wikitext-2-raw-v1")


def test_hf_corpus_through_a_stand_in_datasets_module(monkeypatch):
    calls = []

    def load_dataset(path, config=None, streaming=False):
        calls.append((path, config, streaming))
        if path == "offline":
            raise ConnectionError("no network")
        rows = {"train": [{"id": i, "text": f"train row {i}"} for i in range(50)],
                "validation": [{"id": 0, "text": "held out"}, {"id": 1, "text": ""}]}
        return rows if config == "with-validation" else {"train": rows["train"]}

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    corpus = load_corpus("hf:org/data:with-validation")
    assert calls[-1] == ("org/data", "with-validation", False)
    assert corpus.validation == "held out" and corpus.train.count("train row") == 50
    split = load_corpus("hf:org/data", max_chars=10_000)
    assert calls[-1] == ("org/data", None, True)
    assert split.train.count("train row") + split.validation.count("train row") == 50
    with pytest.raises(CorpusError, match="offline corpora"):
        load_corpus("hf:offline")


# --- token batches ---------------------------------------------------------------------------------

def test_token_batches_shapes_blocks_and_seeding():
    tokens = torch.arange(1003)
    batches = TokenBatches(tokens, batch_size=4, seq_len=10, seed=0)
    assert len(batches) == 25  # 100 whole blocks, 4 per batch; the 3 extra tokens are dropped
    epoch = list(batches)
    assert len(epoch) == 25 and all(b.shape == (4, 10) and b.dtype == torch.long for b in epoch)
    blocks = torch.cat(epoch)
    assert torch.equal(blocks[:, 1:] - blocks[:, :-1], torch.ones(100, 9, dtype=torch.long))  # contiguous
    assert sorted(blocks[:, 0].tolist()) == list(range(0, 1000, 10))  # every block once
    assert torch.equal(torch.cat(list(TokenBatches(tokens, 4, 10, seed=0))), blocks)
    assert not torch.equal(torch.cat(list(TokenBatches(tokens, 4, 10, seed=1))), blocks)
    assert not torch.equal(torch.cat(list(batches)), blocks)  # the next epoch is reshuffled
    in_order = TokenBatches(tokens, 4, 10, shuffle=False, drop_last=False)
    assert len(in_order) == 25 and list(in_order)[0][0, 0] == 0
    ragged = list(TokenBatches(tokens, 3, 10, shuffle=False, drop_last=False))
    assert len(ragged) == 34 and ragged[-1].shape == (1, 10)
    generator = torch.Generator().manual_seed(3)
    text = TokenBatches("hello world " * 10, 2, 8, tokenizer=ByteTokenizer(), generator=generator)
    assert next(iter(text)).shape == (2, 8)
    with pytest.raises(ValueError):
        TokenBatches(torch.arange(5), 1, 10)


def test_tokenize_long_text_in_pieces():
    text = "line one\nline two\n" * 500
    ids = tokenize(ByteTokenizer(), text, chunk_chars=100)
    assert ids.tolist() == list(text.encode()) and ids.dtype == torch.long


# --- perplexity ------------------------------------------------------------------------------------

def tiny_model():
    return mor_lab.random_decoder(mor_lab.ModelConfig(max_position_embeddings=128), seed=0)


def direct_ppl(model, ids):
    """exp(mean NLL) from one forward pass over the whole sequence."""
    with torch.no_grad():
        logits = model(ids[None])[0]
    return math.exp(F.cross_entropy(logits[:-1], ids[1:]).item())


def test_perplexity_in_one_window_equals_a_direct_computation():
    model = tiny_model()
    text = "The quick brown fox jumps over the lazy dog. " * 2
    ids = torch.tensor(ByteTokenizer().encode(text))
    result = perplexity(model, ByteTokenizer(), text, max_length=128, stride=64)
    assert result.tokens == len(ids) - 1
    assert result.ppl == pytest.approx(direct_ppl(model, ids), rel=1e-5)
    assert result.ppl == pytest.approx(math.exp(result.nll))
    assert perplexity(model, None, ids, max_length=128).ppl == pytest.approx(result.ppl, rel=1e-6)


def test_strided_windows_score_every_token_once():
    for n, max_length, stride in [(1, 4, 2), (10, 4, 1), (100, 16, 5), (97, 32, 32), (33, 32, 16)]:
        scored = [t for w in strided_windows(n, max_length, stride) for t in range(w.score_from, w.end)]
        windows = strided_windows(n, max_length, stride)
        assert all(w.end - w.begin <= max_length for w in windows)
        if stride < max_length:
            assert scored == list(range(1, n))
            assert all(w.score_from - w.begin >= max_length - stride for w in windows[1:])


def test_strided_perplexity_with_a_context_free_model_equals_the_full_pass():
    """A bigram model ignores context, so any window plan that scores each token once gives one answer."""
    table = torch.randn(256, 256, generator=torch.Generator().manual_seed(0))

    def bigram(input_ids):
        return table[input_ids]

    ids = torch.randint(0, 256, (301,), generator=torch.Generator().manual_seed(1))
    expected = math.exp(F.cross_entropy(table[ids[:-1]], ids[1:]).item())
    for max_length, stride, batch_size in [(301, 301, 1), (64, 16, 3), (50, 49, 2), (7, 3, 8)]:
        result = perplexity(bigram, None, ids, max_length=max_length, stride=stride, batch_size=batch_size)
        assert result.tokens == 300
        assert result.ppl == pytest.approx(expected, rel=1e-5), (max_length, stride)


def test_strided_perplexity_does_not_depend_on_batching():
    model = tiny_model().train()
    ids = torch.randint(0, 256, (160,), generator=torch.Generator().manual_seed(2))
    one = perplexity(model, None, ids, max_length=48, stride=20, batch_size=1)
    many = perplexity(model, None, ids, max_length=48, stride=20, batch_size=5)
    assert one.tokens == many.tokens == 159
    assert many.ppl == pytest.approx(one.ppl, rel=1e-5)
    assert perplexity(model, None, ids, max_length=48, stride=20, max_tokens=100).tokens == 99
    assert model.training  # evaluated in eval mode, handed back as it came


def test_perplexity_argument_errors():
    model = tiny_model()
    ids = torch.arange(50)
    with pytest.raises(ValueError, match="stride"):
        perplexity(model, None, ids, max_length=16, stride=32)
    with pytest.raises(ValueError, match="context"):
        perplexity(model, None, ids, max_length=256, stride=128)
    with pytest.raises(ValueError, match="empty"):
        perplexity(model, ByteTokenizer(), "  ", max_length=16)
    with pytest.raises(ValueError, match="tokenizer"):
        perplexity(model, None, "text without a tokenizer", max_length=16)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        perplexity(model, None, [5], max_length=16)


@pytest.mark.smollm2
def test_smollm2_perplexity_on_pydoc_validation(smollm2):
    model, tokenizer = smollm2
    text = load_corpus("pydoc").validation
    result = perplexity(model, tokenizer, text, max_length=1024, stride=512, max_tokens=2048, batch_size=2)
    print(f"\nSmolLM2-135M-Instruct on pydoc validation (max_length 1024, stride 512): {result}")
    assert result.tokens == 2047
    assert 5 < result.ppl < 40
