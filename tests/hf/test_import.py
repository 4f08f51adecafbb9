"""`somoe import-hf`: tiny random GPT-2 and Llama (grouped-query) checkpoints become somoe dense runs
with the same logits (renumbered tokens), that generate, evaluate, train on and upcycle."""

from __future__ import annotations

import json

import pytest
import torch

from somoe.cli import main
from somoe.config import load_config
from somoe.evaluate.scoring import evaluate_run
from somoe.generate.sampling import GenerationConfig, generate_text
from somoe.evaluate.runs import load_run
from somoe.train.trainer import Trainer

import transformers  # the [hf] extra: installed by run.sh, so these tests run (never skip) in CI
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

TEXT = ["Once upon a time there was a little dog.", "The cat sat on the mat and looked at the sun.",
        "Tom and Lily went to the park to play with a red ball."] * 20


def byte_level_tokenizer(specials: list[str]) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXT, trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def save_hf(folder, model, tok: Tokenizer, **special) -> None:
    model.save_pretrained(folder, max_shard_size="40KB")  # several shards: the index is exercised
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, **special).save_pretrained(folder)


def gpt2_folder(root):
    tok = byte_level_tokenizer(["<|endoftext|>"])  # GPT-2: one special, EOS at id 0 here
    cfg = transformers.GPT2Config(vocab_size=tok.get_vocab_size(), n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                  activation_function="gelu", initializer_range=0.3, eos_token_id=0, bos_token_id=0)
    torch.manual_seed(0)
    save_hf(root / "gpt2", transformers.GPT2LMHeadModel(cfg), tok, eos_token="<|endoftext|>",
            bos_token="<|endoftext|>")
    return root / "gpt2"


def llama_folder(root):
    tok = byte_level_tokenizer(["<unk>", "<s>", "</s>", "<pad>"])
    cfg = transformers.LlamaConfig(vocab_size=tok.get_vocab_size() + 5, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=64, tie_word_embeddings=False, initializer_range=0.3,
                                   rope_theta=500.0, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    torch.manual_seed(0)
    save_hf(root / "llama", transformers.LlamaForCausalLM(cfg), tok, unk_token="<unk>", bos_token="<s>",
            eos_token="</s>", pad_token="<pad>")
    return root / "llama"


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def imported(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"import-{request.param}")
    folder = (gpt2_folder if request.param == "gpt2" else llama_folder)(root)
    assert len(list(folder.glob("model-*.safetensors"))) > 1
    assert main(["import-hf", str(folder), "--out", str(root / "run")]) == 0
    return folder, root / "run"


def test_imported_run_has_the_same_logits_and_tokens(imported):
    folder, run = imported
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder)
    loaded = load_run(run, device="cpu")
    text = "Tom and the little cat went to the sun."
    old_ids = hf_tok(text, add_special_tokens=False)["input_ids"]
    vocab = hf_tok.get_vocab()
    new_vocab = Tokenizer.from_file(str(run / "tokenizer.json")).get_vocab()
    old_to_new = {i: new_vocab[s] for s, i in vocab.items() if s in new_vocab}
    assert loaded.tokenizer.encode(text) == [old_to_new[i] for i in old_ids]
    renamed = {hf_tok.unk_token_id: 0, hf_tok.pad_token_id: 1, hf_tok.eos_token_id: 2}  # [UNK], [PAD], [EOS]
    assert not set(renamed) & set(old_to_new)  # the source's special names are gone
    old_to_new.update({old: new for old, new in renamed.items() if old is not None})
    ids_old = torch.randint(0, hf_tok.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    ids_new = torch.tensor([[old_to_new[i] for i in row] for row in ids_old.tolist()])
    cols_old = torch.tensor(sorted(old_to_new))
    cols_new = torch.tensor([old_to_new[i] for i in cols_old.tolist()])
    with torch.no_grad():
        theirs = hf_model(ids_old).logits[..., cols_old]
        ours = loaded.model(ids_new).logits[..., cols_new]
    assert theirs.std() > 0.5
    assert (theirs - ours).abs().max() < 1e-4


def test_imported_run_generates_evaluates_trains_and_upcycles(imported, tmp_path):
    _, run = imported
    loaded = load_run(run, device="cpu")
    text = generate_text(loaded.model, loaded.tokenizer, ["Once upon"], GenerationConfig(max_new_tokens=5, greedy=True))
    assert isinstance(text[0], str)
    data = tmp_path / "eval.txt"
    data.write_text("\n<|endoftext|>\n".join(TEXT[:6]), encoding="utf-8")
    result = evaluate_run(run, data=str(data), device="cpu")
    assert result["bpb"] > 0
    small = ["data.builtin_train_stories=100", "data.builtin_val_stories=20", "data.seq_len=32",
             "train.batch_size=4", "train.max_steps=2", "train.eval_every=2", "train.eval_batches=2",
             "train.device=cpu", "train.warmup_steps=0"]
    cfg = load_config(config_file=str(run / "config.yaml"), overrides=small + [f"data.cache_dir={tmp_path / 'c'}"])
    Trainer(cfg, run, resume="auto", progress=False, log=lambda m: None).fit()
    assert (run / "checkpoints" / "step-00000002").is_dir()
    assert main(["upcycle", str(run), "--out", str(tmp_path / "moe"), "--experts", "4", "--top-k", "2",
                 "--device", "cpu"]) == 0
    assert json.loads((tmp_path / "moe" / "upcycle.json").read_text())["passed"]


def test_import_refuses_bad_input_and_writes_nothing(tmp_path, capsys):
    folder = gpt2_folder(tmp_path)
    out = tmp_path / "run"
    (folder / sorted(folder.glob("model-*.safetensors"))[1].name).unlink()
    assert main(["import-hf", str(folder), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "is missing" in err and "model.safetensors.index.json" in err and not out.exists()
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "bert", "architectures": ["BertModel"]}))
    assert main(["import-hf", str(folder), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "BertModel cannot be imported" in err[0]
    assert "GPT2LMHeadModel" in err[0] and "LlamaForCausalLM" in err[0] and not out.exists()
