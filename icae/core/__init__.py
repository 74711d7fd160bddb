"""Components: the model and the pure pieces it is built from. Nothing here reads a data set or parses a flag.

- config.py      ICAEConfig: the model's switches (m, r, layout, decoder mode, LoRA)
- positions.py   position ids of every layout (pure functions; docs/POSITIONS.md)
- collate.py     examples -> padded encoder/decoder tensors (pure)
- examples.py    ICAE v2's pretraining examples: AE and LM targets (pure)
- qa_examples.py fine-tuning examples: [slots, [FT], prompt part, answer, EOS]; chat templates
- losses.py      the decoder loss: cross-entropy in vocabulary chunks, no logit tensor
- metrics.py     BLEU, exact match, token accuracy, perplexity; QA exact match, token F1, ROUGE (pure)
- base_model.py  which base LM to load (embedded SmolLM2, .gguf, HF folder, hub id)
- model.py       ICAE: encoder and decoder on one base model, save and load
- inference.py   compress / reconstruct / generate: the decode loop
- memory.py      Memory: what compress returns and reconstruct/generate read, and its file
- precision.py bf16 on CPUs: detected from /proc/cpuinfo, refused where emulated; fp32 attention under bf16
- quiet.py       quiet by default: dependencies' warnings, log lines and loading bars hidden unless --verbose
"""
