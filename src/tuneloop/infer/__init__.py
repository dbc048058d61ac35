"""Inference: below train/, eval/ and serve/, which all read models through it.

encode.py    tokenizer, text templates and chat wrapping (classify), chat turns with an answer mask (sft)
batching.py  longest-first batches, padding, progress columns
device.py    device, dtype, CPU threads
attention.py the GEMM attention for bf16 on CPU and the bf16 adapter-input switch
loaders.py   a trained model back from its `model/` folder, one loader per task (`LOADERS`)
predict.py   batched class probabilities, regression outputs, answer losses and greedy answers
"""
