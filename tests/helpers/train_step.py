"""The per-device train step as the train-step tests (and their multi-device scripts) run it, and a torch AdamW
step as the oracle for one step on imported HF weights."""

import functools

import jax
import numpy as np

from aigc_jax import configs, model, parallel, sharding
from aigc_jax.train import optimizer as optim
from aigc_jax.train.step import init_state, train_step

TINY = configs.get_preset("tiny").replace(vocab_size=61, n_positions=16)


def batch(seed, rows, T=16, vocab=61):
    """Learnable rows (each counts up by a per-row stride from a random start) with a random 80% loss mask."""
    rng = np.random.default_rng(seed)
    start, stride = rng.integers(0, vocab, (rows, 1)), rng.integers(1, 3, (rows, 1))
    tokens = ((start + stride * np.arange(T + 1)) % vocab).astype(np.int32)
    return {"tokens": tokens, "loss_mask": (rng.random((rows, T)) < 0.8).astype(np.float32)}


def run_steps(mode, devices, steps, train_config, batches):
    mesh = sharding.make_mesh(devices=devices)
    opt = optim.make(train_config)
    fn = parallel.wrap(functools.partial(train_step, model_config=TINY, train_config=train_config, optimizer=opt),
                       mode, mesh, ("rep", "data"), ("rep", "rep"))
    state = parallel.replicate(init_state(model.init_params(TINY, jax.random.key(0)), opt, 0), mesh)
    losses = []
    for s in range(steps):
        state, m = fn(state, parallel.shard_batch(batches[s], mode, mesh))
        losses.append(float(m["loss"]))
    return state, losses


def torch_adamw_step(hf_model, tokens, tc):
    """transformers + clip_grad_norm_ + torch.optim.AdamW, decay on every >= 2-D weight (matrices, embeddings), on
    the mean next-token loss: (loss, grad norm, clipped grads by name, the new state dict)."""
    import torch

    hf_model.train()
    t = torch.tensor(tokens, dtype=torch.long)
    logits = hf_model(t[:, :-1]).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), t[:, 1:].reshape(-1))
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(hf_model.parameters(), tc.grad_clip)
    grads = {k: p.grad.numpy().copy() for k, p in hf_model.named_parameters()}
    decay = [p for p in hf_model.parameters() if p.dim() >= 2]
    no_decay = [p for p in hf_model.parameters() if p.dim() < 2]
    torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                      lr=tc.lr, betas=(tc.beta1, tc.beta2), eps=tc.eps).step()
    return loss.item(), float(norm), grads, {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}


def our_step(config, params, tokens, tc):
    """Our train step on one device, all targets weighted: (new params in HF names, metrics)."""
    from aigc_jax.interop import hf

    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    opt = optim.make(tc)
    fn = parallel.wrap(functools.partial(train_step, model_config=config, train_config=tc, optimizer=opt),
                       "shard_map", mesh, ("rep", "data"), ("rep", "rep"))
    mask = np.ones((tokens.shape[0], tokens.shape[1] - 1), np.float32)
    state, metrics = fn(init_state(params, opt, 0), {"tokens": tokens, "loss_mask": mask})
    return hf.to_hf_state_dict(jax.device_get(state.params), config), metrics
