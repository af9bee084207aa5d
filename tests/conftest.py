"""Shared fixtures: tiny randomly initialised transformers models of several families."""
import os

# Triton kernels are tested on CPU tensors in triton's interpreter, which must be switched on
# before the kernels are defined (when sparsecc.codegen is first imported; setting it before
# `import sparsecc` is enough). On a GPU machine run with
# TRITON_INTERPRET=0 to test them on the device.
os.environ.setdefault("TRITON_INTERPRET", "1")
# On a GPU, kernels would autotune every new shape hypothesis draws; tests/codegen/test_tuning.py
# checks the tuner, the other tests run the default configs.
os.environ.setdefault("SPARSECC_AUTOTUNE", "0")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import settings  # noqa: E402

import sparsecc.backend  # noqa: E402,F401  registers backend="sparsecc" where the package is not installed

settings.register_profile("ci", deadline=None, derandomize=True, max_examples=25, print_blob=True)
settings.register_profile("dev", deadline=None, max_examples=25)
settings.load_profile("ci" if os.environ.get("CI") else os.environ.get("HYPOTHESIS_PROFILE", "dev"))

VOCAB = 128


def _families():
    from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MistralConfig,
                              MistralForCausalLM, MixtralConfig, MixtralForCausalLM, OPTConfig, OPTForCausalLM)
    common = dict(vocab_size=VOCAB, max_position_embeddings=64)
    return {
        "llama": lambda: LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                      num_attention_heads=4, num_key_value_heads=2, **common)),
        "mistral": lambda: MistralForCausalLM(MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                            num_attention_heads=4, num_key_value_heads=2,
                                                            sliding_window=8, **common)),
        "mixtral": lambda: MixtralForCausalLM(MixtralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                            num_attention_heads=4, num_key_value_heads=2,
                                                            num_local_experts=4, num_experts_per_tok=2, **common)),
        "opt": lambda: OPTForCausalLM(OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                                                word_embed_proj_dim=64, **common)),
        "gpt2": lambda: GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                                   bos_token_id=0, eos_token_id=0)),
    }


FAMILIES = ["llama", "mistral", "mixtral", "opt", "gpt2"]


@pytest.fixture
def make_model():
    """make_model(family, seed=0) -> a tiny model in eval mode."""
    def make(family: str = "llama", seed: int = 0):
        torch.manual_seed(seed)
        return _families()[family]().eval()
    return make


@pytest.fixture
def batches():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (2, 16), generator=g) for _ in range(3)]


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_state(model, snap) -> bool:
    return all(torch.equal(v, snap[k]) for k, v in model.state_dict().items())


@pytest.fixture
def state_tools():
    return snapshot, same_state


@pytest.fixture(scope="session")
def zoo_cache(tmp_path_factory):
    """Where zoo models trained by the tests are cached: a temp dir for the session."""
    return str(tmp_path_factory.mktemp("zoo-cache"))


@pytest.fixture(scope="session")
def tiny_zoo():
    """(model, tokenizer, info, seconds): the zoo's tiny model as shipped in the package (trained on
    WikiText-2; nothing trains). Tests must deepcopy the model before changing it."""
    import time

    from sparsecc.zoo import load_model
    t0 = time.perf_counter()
    model, tok, info = load_model("tiny")
    return model, tok, info, time.perf_counter() - t0


@pytest.fixture(scope="session")
def tiny_streams():
    """(train_ids, test_ids): WikiText-2's splits as shipped, encoded with the zoo tokenizer."""
    from sparsecc.zoo import load_tokens
    tokens = load_tokens()
    return tokens.train, tokens.test


@pytest.fixture
def kernel_calls(monkeypatch):
    """kernel_calls("nm_linear_triton") wraps that registered Triton kernel of a sparsecc op
    (sparsecc.ops.dispatch.WAYS) and returns the list the shape of each call's first argument is appended to."""
    from sparsecc.ops.dispatch import WAYS

    def spy(name):
        ways = next(w for w in WAYS.values() if w.kernel.__name__ == name)
        calls, kernel = [], ways.kernel
        monkeypatch.setattr(ways, "kernel", lambda *a, **k: calls.append(a[0].shape) or kernel(*a, **k))
        return calls
    return spy


@pytest.fixture
def compiled_with_kernel(kernel_calls):
    """compiled_with_kernel(model, recipe, "cats_mlp_triton", x): sparsify_ the model (calibrated on
    random tokens), compile it with kernels="triton", check it matches eager on x, and return the
    shapes the named kernel was called with."""
    import sparsecc

    def run(model, recipe, kernel, x):
        ids = torch.randint(0, VOCAB, (4096,), generator=torch.Generator().manual_seed(0))
        sparsecc.sparsify_(model, recipe, sparsecc.sample_batches(ids, 8, 16, seed=0), progress=False)
        calls = kernel_calls(kernel)
        torch._dynamo.reset()
        with torch.no_grad():
            eager = model(x).logits
            out = torch.compile(model, backend="sparsecc", options={"kernels": "triton"})(x).logits
        torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-4)
        return calls
    return run
