"""training/memory.py: the peak-memory estimate of a training run, from the model's config alone, against
independent counts on tiny random models: the instantiated model's bytes (and bitsandbytes' quantized ones), the
prompt's parameters counted by hand and a real optimizer's state, torch's own record of what autograd keeps for the
backward, and the peak of live tensor bytes during real training steps (with and without gradient checkpointing);
then the refusal."""

from __future__ import annotations

import re
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from transformers import AutoModelForCausalLM, LlamaConfig
from transformers.optimization import Adafactor

from conftest import tiny_config, tiny_tokenizer
from softprompt import methods
from softprompt.backbones import backbone_for
from softprompt.config import PromptConfig
from softprompt.data import Example
from softprompt.errors import SoftPromptError
from softprompt.training import memory
from softprompt.training.loop import loss_on

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def llama(kv_heads: int = 2, layers: int = 3, tie: bool = False) -> LlamaConfig:
    """Wider than conftest's tiny models, so activations outweigh the fixed bits (rotary tables, index tensors)."""
    return LlamaConfig(hidden_size=128, intermediate_size=344, num_hidden_layers=layers, num_attention_heads=4,
                       num_key_value_heads=kv_heads, vocab_size=128, max_position_embeddings=1024,
                       tie_word_embeddings=tie)  # fmt: skip


def backbone_of(config, dtype: torch.dtype):
    torch.manual_seed(0)
    return backbone_for(AutoModelForCausalLM.from_config(config, dtype=dtype).eval(), tiny_tokenizer())


def rows(batch: int, length: int, target: int) -> list[Example]:
    """`batch` rows of exactly `length` real tokens, the last `target` of them the loss."""
    ids = torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(0)).tolist()
    return [Example(row[:-target], row[-target:]) for row in ids]


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


# ---------------------------------------------------------------------------------------------------- weights
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen3"])
def test_weights_are_the_instantiated_models_bytes(arch, dtype):
    """The weights term, from the config alone, is what the model built in that dtype holds: its parameters (tied
    ones once) and buffers."""
    model = AutoModelForCausalLM.from_config(tiny_config(arch), dtype=DTYPES[dtype])
    held = nbytes(model.parameters()) + nbytes(model.buffers())
    config = PromptConfig(init="random", num_tokens=4)
    assert memory.estimate(tiny_config(arch), prompt_config=config, dtype=dtype, batch_size=1,
                           max_length=8).weights == held  # fmt: skip


def test_tied_embeddings_count_once_and_quantized_layers_by_hand():
    """Tied input and output embeddings are one tensor; a 4-bit base stores its decoder layers' linear weights at
    half a byte plus a float32 scale per 64 values, an 8-bit one at a byte plus a float32 scale per output row,
    everything else in the dtype. Counted here from the config's numbers."""
    h, i, layers, vocab, kv = 128, 344, 3, 128, 2 * 32  # kv: 2 heads of 32
    linear = layers * (h * h + 2 * h * kv + h * h + 3 * h * i)  # q, k, v, o; gate, up, down
    rows_out = layers * (h + 2 * kv + h + 2 * i + h)
    rest = vocab * h + layers * 2 * h + h  # embeddings (tied: once), two norms per layer, the final norm
    rotary = 2 * 16 * 4  # inv_freq and its original copy, float32, head_dim / 2 each
    shape = dict(prompt_config=PromptConfig(init="random", num_tokens=4), batch_size=1, max_length=8)
    assert memory.estimate(llama(tie=True), dtype="bfloat16", **shape).weights == 2 * (linear + rest) + rotary
    untied = memory.estimate(llama(tie=False), dtype="bfloat16", **shape).weights
    assert untied == 2 * (linear + rest + vocab * h) + rotary
    four = memory.estimate(llama(tie=True), dtype="bfloat16", bits=4, **shape).weights
    assert four == 2 * rest + int(linear * (0.5 + 4 / 64)) + rotary
    eight = memory.estimate(llama(tie=True), dtype="bfloat16", bits=8, **shape).weights
    assert eight == 2 * rest + linear + 4 * rows_out + rotary


def held_by_bitsandbytes(model) -> int:
    """Every storage a quantized model holds: parameters (packed), buffers, and what bitsandbytes keeps beside them
    (4-bit: the blocks' absmax and the code table; 8-bit: the rows' scales)."""
    storages = [t.untyped_storage() for t in (*model.parameters(), *model.buffers())]
    for module in model.modules():
        weight = getattr(module, "weight", None)
        state = getattr(weight, "quant_state", None)
        storages += [t.untyped_storage() for t in (getattr(state, "absmax", None), getattr(state, "code", None),
                                                   getattr(weight, "SCB", None)) if isinstance(t, torch.Tensor)]
    return sum({s.data_ptr(): s.nbytes() for s in storages}.values())


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_weights_are_what_bitsandbytes_holds(bits, tmp_path):
    """A tiny Llama saved, then loaded through transformers with bitsandbytes (which quantizes on the CPU too): the
    weights term is what the loaded model holds, to its 4-bit code tables (64 bytes a layer, not counted)."""
    from transformers import BitsAndBytesConfig

    config = llama(tie=True)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(tmp_path)
    quantization = (BitsAndBytesConfig(load_in_8bit=True) if bits == 8 else BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16))  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=quantization, dtype=torch.bfloat16,
                                                 device_map={"": "cpu"})  # fmt: skip
    est = memory.estimate(config, prompt_config=PromptConfig(init="random"), dtype="bfloat16", bits=bits,
                          batch_size=1, max_length=8)  # fmt: skip
    assert est.weights == pytest.approx(held_by_bitsandbytes(model), rel=0.01)


# ---------------------------------------------------------------------------------------------------- trainable
@pytest.mark.parametrize("settings", [dict(method="prompt"), dict(method="prompt", residual=True),
                                      dict(method="prefix"), dict(method="prefix", prefix_mlp=True)],
                         ids=["prompt", "prompt-residual", "prefix", "prefix-mlp"])  # fmt: skip
def test_trainable_is_the_methods_parameters_by_hand(settings):
    """Float32 parameter, gradient and AdamW's two moments: 16 bytes per trainable value, the values counted by
    hand from the shapes each method trains."""
    n, h, layers, kv, hd, m = 5, 128, 3, 2, 32, 24
    config = PromptConfig(init="random", num_tokens=n, mlp_hidden=m, **settings)
    flat = layers * 2 * kv * hd  # one virtual token's K/V over all layers
    count = {"prompt": n * h, "prompt-residual": n * h + (h * m + m) + (m * h + h) + 2 * h,
             "prefix": layers * 2 * kv * n * hd, "prefix-mlp": n * h + (h * m + m) + (m * flat + flat)}  # fmt: skip
    key = settings["method"] + ("-residual" if settings.get("residual") else "-mlp" if settings.get("prefix_mlp")
                                else "")  # fmt: skip
    est = memory.estimate(llama(), prompt_config=config, dtype="bfloat16", batch_size=1, max_length=8)
    assert est.trainable == 16 * count[key]


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor"])
@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_trainable_is_what_a_real_optimizer_step_holds(method, optimizer):
    """After one real step of the optimizer `make_optimizer` builds: the prompt's parameters, their gradients and
    every state tensor the optimizer keeps (Adafactor: factored rows and columns)."""
    backbone = backbone_of(llama(), torch.bfloat16)
    config = PromptConfig(method=method, init="random", num_tokens=5)
    prompt = methods.build(config, backbone)
    params = list(prompt.parameters())
    opt = (Adafactor(params, lr=1e-3, scale_parameter=False, relative_step=False) if optimizer == "adafactor"
           else torch.optim.AdamW(params, lr=1e-3))  # fmt: skip
    loss, _ = loss_on(backbone, prompt.training_input(backbone), rows(2, 12, 3))
    loss.backward()
    opt.step()
    state = [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor) and v.dim() > 0]
    held = nbytes(params) + nbytes(p.grad for p in params) + nbytes(state)
    est = memory.estimate(llama(), prompt_config=config, dtype="bfloat16", batch_size=2, max_length=12,
                          optimizer=optimizer)  # fmt: skip
    assert est.trainable == held


# ---------------------------------------------------------------------------------------------------- activations
@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", ["prompt", "prefix"])
@pytest.mark.parametrize("batch,length", [(4, 40), (2, 260)], ids=["packed", "row-per-row"])
def test_activations_are_what_autograd_keeps(method, dtype, kv_heads, batch, length):
    """What the forward keeps for the backward, as torch itself hands it to autograd (saved-tensor hooks over a real
    `loss_on`: every storage saved, weights excluded), within 5 %. Rows shorter than the packing width share packed
    rows; longer ones fill one each."""
    config = llama(kv_heads, layers=2)
    backbone = backbone_of(config, DTYPES[dtype])
    prompt_config = PromptConfig(method=method, init="random", num_tokens=6)
    prompt = methods.build(prompt_config, backbone)
    weights = {p.untyped_storage().data_ptr() for p in backbone.model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        saved.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss_on(backbone, prompt.training_input(backbone), rows(batch, length, 2))
    kept = sum(size for ptr, size in saved.items() if ptr not in weights)
    est = memory.estimate(config, prompt_config=prompt_config, dtype=dtype, batch_size=batch, max_length=length,
                          target_length=2)  # fmt: skip
    assert est.activations == pytest.approx(kept, rel=0.05)


class LiveBytes(TorchDispatchMode):
    """The peak of live tensor bytes while active, above what lived before (`existing`): every storage an operation
    creates counts until it is freed (a view of an existing tensor, such as a weight's transpose, is not new)."""

    def __init__(self, existing):
        super().__init__()
        self.live = self.peak = 0
        self.alive: dict[int, weakref.finalize | None] = {t.untyped_storage().data_ptr(): None for t in existing}

    def freed(self, key: int, size: int) -> None:
        self.live -= size
        self.alive.pop(key, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            storage = t.untyped_storage() if isinstance(t, torch.Tensor) else None
            if storage is not None and storage.data_ptr() and storage.data_ptr() not in self.alive:
                self.live += storage.nbytes()
                self.peak = max(self.peak, self.live)
                self.alive[storage.data_ptr()] = weakref.finalize(storage, self.freed, storage.data_ptr(),
                                                                  storage.nbytes())  # fmt: skip
        return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_total_is_the_peak_of_live_tensors_in_a_training_step(method, checkpointing, dtype):
    """A real training step as the loop runs it (forward, loss, backward, AdamW step), its peak of live tensor bytes
    counted op by op, plus what lived before it (weights, prompt, optimizer state after a first step): the total
    within 10 %, with gradient checkpointing too."""
    config = llama(layers=3)
    backbone = backbone_of(config, DTYPES[dtype]).gradient_checkpointing(checkpointing)
    prompt_config = PromptConfig(method=method, init="random", num_tokens=8)
    prompt = methods.build(prompt_config, backbone)
    opt = torch.optim.AdamW(prompt.parameters())
    examples = rows(4, 64, 16)

    def step():
        loss, _ = loss_on(backbone, prompt.training_input(backbone), examples)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # the optimizer's state exists from here on, as in every later step
    before = [*backbone.model.parameters(), *backbone.model.buffers(), *prompt.parameters(),
              *(v for s in opt.state.values() for v in s.values() if v.dim())]  # fmt: skip
    with LiveBytes(before) as meter:
        step()
    measured = nbytes(before) + meter.peak
    est = memory.estimate(config, prompt_config=prompt_config, dtype=dtype, batch_size=4, max_length=64,
                          target_length=16, gradient_checkpointing=checkpointing)  # fmt: skip
    assert est.total == pytest.approx(measured, rel=0.10)
    if checkpointing:  # and it is the smaller one: what the option is for
        assert est.total < est.changed(gradient_checkpointing=False).total


# ---------------------------------------------------------------------------------------------------- the check
def meminfo_total() -> int:
    with open("/proc/meminfo") as f:
        return int(re.search(r"MemTotal:\s+(\d+) kB", f.read()).group(1)) * 1024


def test_available_memory_of_the_cpu_is_the_hosts():
    assert 0 < memory.available_memory("cpu") <= meminfo_total()


def test_check_fits_refuses_with_what_is_needed_what_there_is_and_what_to_change():
    est = memory.estimate(llama(), prompt_config=PromptConfig(init="random", num_tokens=8), dtype="float32",
                          batch_size=16, max_length=300)  # fmt: skip
    memory.check_fits(est, "cuda:0", available=est.total)  # exactly enough: passes
    memory.check_fits(est, "cpu")  # a tiny run on this machine's real free memory: passes
    too_little = est.changed(gradient_checkpointing=True).total  # checkpointing alone would fit
    with pytest.raises(SoftPromptError) as refused:
        memory.check_fits(est, "cuda:0", available=too_little)
    message = str(refused.value)
    assert f"needs {est.text} on cuda:0: more than the {memory.size_text(too_little)} free there" in message
    assert re.search(r"--gradient-checkpointing: [\d.]+ [KMG]iB \(fits\)", message)
    assert re.search(r"micro-batches of \d+ rows \(a \d+ times larger --grad-accum", message)
    assert "--dtype bfloat16" in message and "a device with" in message


def test_a_cpu_is_asked_for_what_glibc_keeps_unless_its_threshold_is_pinned(monkeypatch):
    """glibc's malloc keeps freed blocks on the CPU (README, "Memory"): the check asks for that too, and says how to
    avoid it; with MALLOC_MMAP_THRESHOLD_ set the estimate alone is asked for."""
    est = memory.estimate(llama(), prompt_config=PromptConfig(init="random"), batch_size=4, max_length=64)
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    with pytest.raises(SoftPromptError, match="glibc's malloc keeps on a CPU .none with MALLOC_MMAP_THRESHOLD_=65536"):
        memory.check_fits(est, "cpu", available=est.total)
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    memory.check_fits(est, "cpu", available=est.total)


@pytest.mark.parametrize("bad,expected", [
    (dict(batch_size=0), "sizes must be at least 1"),
    (dict(dtype="float64"), "use one of float32, bfloat16, float16"),
    (dict(bits=3), "bits 8, 4 or None"),
])  # fmt: skip
def test_bad_settings_are_refused_with_what_to_use(bad, expected):
    settings = {"prompt_config": PromptConfig(init="random"), "batch_size": 1, "max_length": 8, **bad}
    with pytest.raises(SoftPromptError, match=re.escape(expected)):
        memory.estimate(llama(), **settings)


def test_a_run_of_short_rows_is_estimated_for_its_rows_not_max_length(tmp_path, capsys):
    """check_memory bounds the estimate by the training data's longest row, counted here by an independent
    tokenization, where it is shorter than max_length: with a large vocabulary the logits over 512 positions
    would refuse a run of short sentences that fits."""
    from softprompt.config import TaskConfig, TrainConfig
    from softprompt.models import LoadConfig
    from softprompt.prepare import check_memory

    folder = tmp_path / "model"
    AutoModelForCausalLM.from_config(tiny_config("llama")).save_pretrained(folder)
    tokenizer = tiny_tokenizer()
    tokenizer.save_pretrained(folder)
    capsys.readouterr()
    config = TaskConfig(template="In: {x}\nOut:", task="generation", target_field="y")
    records = [{"x": "a b", "y": "c"}, {"x": "a b c d e", "y": "d e f"}]
    longest = max(len(tokenizer(f"In: {r['x']}\nOut:")["input_ids"])
                  + len(tokenizer(" " + r["y"], add_special_tokens=False)["input_ids"]) + 1 for r in records)
    target = max(len(tokenizer(" " + r["y"], add_special_tokens=False)["input_ids"]) + 1 for r in records)
    train, load, prompt = TrainConfig(), LoadConfig(device="cpu"), PromptConfig(num_tokens=4, init="vocab")

    def printed(**data) -> str:
        check_memory(folder, load, prompt, train, **data)
        return capsys.readouterr().err

    model_config = AutoModelForCausalLM.from_config(tiny_config("llama")).config
    expected = memory.estimate_run(model_config, prompt, train, dtype=torch.float32, max_length=longest,
                                   target_length=target)
    assert printed(data=[(config, records)]) == f"softprompt: estimated peak memory {expected.text} on cpu\n"
    unbounded = memory.estimate_run(model_config, prompt, train, dtype=torch.float32)
    assert printed() == f"softprompt: estimated peak memory {unbounded.text} on cpu\n"
    assert expected.total < unbounded.total
