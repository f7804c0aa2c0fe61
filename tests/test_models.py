import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from stepdapo.config import TinyModelConfig
from stepdapo.models import char_tokenizer, load_policy, tiny_llama


def test_char_tokenizer_roundtrip():
    tok = char_tokenizer()
    assert isinstance(tok, PreTrainedTokenizerFast)
    text = "3+5-2+7\n3+5=8\n8-2=6\nA=3"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text)  # one token per character, newline included
    assert tok.decode(ids) == text
    assert tok(text)["input_ids"][0] == tok.bos_token_id


def test_saved_tiny_model_reloads_with_auto_classes(tmp_path):
    tok = char_tokenizer()
    model = tiny_llama(tok, TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2,
                                            intermediate_size=64)).eval()
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    model2 = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    tok2 = AutoTokenizer.from_pretrained(tmp_path)
    text = "3+5-2\n3+5=8\n"
    ids = tok(text, return_tensors="pt")["input_ids"]
    assert tok2(text, return_tensors="pt")["input_ids"].tolist() == ids.tolist()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, model2(ids).logits)
    m3, t3 = load_policy(tmp_path)
    assert t3.padding_side == "left" and t3.pad_token_id is not None
    with torch.no_grad():
        assert torch.equal(m3(ids).logits, model(ids).logits)
