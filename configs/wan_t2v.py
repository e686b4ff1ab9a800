"""Wan2.1-T2V AnyFlow, bidirectional, with the reference hyperparameters.

  python -m anyflow_jax.train --config configs/wan_t2v.py:1.3b,teacher --workdir runs/wan13b/teacher \
      --config.init.student=Wan2.1-T2V-1.3B-Diffusers/transformer \
      --config.data.paths=/data/latents-00000.arrayrecord --config.data.negative_embedding=/data/negemb.npy
  python -m anyflow_jax.train --config configs/wan_t2v.py:1.3b,flow_map --workdir runs/wan13b/flow_map \
      --config.init.student=Wan2.1-T2V-1.3B-Diffusers/transformer ...
  python -m anyflow_jax.train --config configs/wan_t2v.py:1.3b,on_policy --workdir runs/wan13b/on_policy \
      --config.init.student=runs/wan13b/flow_map --config.init.teacher=runs/wan13b/teacher ...
  python -m anyflow_jax.train --config configs/wan_t2v.py:14b,consistency --workdir runs/wan14b/cd \
      --config.init.student=runs/wan14b/teacher --config.init.teacher=runs/wan14b/teacher ...

arg: "<size>,<stage>" with size in {1.3b, 14b} and stage in {teacher, flow_map, on_policy,
consistency}.

Needs: a diffusers-format Wan2.1-T2V transformer folder (stage 0 and stage 1 start from the base
model, as the reference does), precomputed VAE latents + UMT5 embeddings in the ArrayRecord
format of docs/data.md (81 frames at 480x832 -> latents (21, 60, 104, 16)), and the negative
prompt's UMT5 embedding as a .npy file of shape (1, 512, 4096). Multi-host: add
--distributed (TPU pods) or --coordinator_address/--num_processes/--process_id.

What is trained: as in the reference, LoRA adapters (rank 256, alpha 256, PEFT init; config.lora)
on the frozen base, with only the adapter factors optimised (their EMA and Adam state; the base is
written once to <workdir>/base). Teacher and stage-2 critic: attn1.to_q/k/v, attn1.to_out.0,
ffn.net.0.proj, ffn.net.2 of every block; flow-map student (stage 1, continued in stage 2 and in
the consistency baseline): those plus the time/delta embedders' linear_1/linear_2. Stage 2's real
score is the teacher's base with its EMA adapter merged once; its critic starts from that adapter
on the teacher's base. --config.lora.enabled=False fine-tunes the full weights and biases of the
same modules instead (optim.trainable_patterns / critic_optim.trainable_patterns).
"""
from anyflow_jax.defaults import wan_config


def get_config(arg: str = "1.3b,teacher"):
    size, _, stage = (arg or "1.3b,teacher").partition(",")
    return wan_config(size.strip().lower(), stage.strip() or "teacher")
