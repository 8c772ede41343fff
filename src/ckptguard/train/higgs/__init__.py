"""The ``higgs-audio`` backend: LoRA fine-tuning of Higgs Audio v2 (boson-multimodal 0.1.1).

Higgs Audio v2 is a Llama backbone with "DualFFN" layers: attention is shared, audio tokens go through
their own ``audio_mlp``. Text is predicted by a text head, audio as 8 codebooks of 1,024 codes by an
audio head. The pieces, each in its own module:

* ``model``      the base model (local HF-layout directory, or a tiny random one from the run config),
                 its tokenizer and the special tokens the ChatML rendering needs
* ``records``    ChatML JSONL records with audio as precomputed code files, validated line by line
* ``samples``    records -> token/label/code samples -> collated batches (boson-multimodal's collator)
* ``loss``       shifted next-token cross-entropy on text and on every audio codebook
* ``backend``    the trainer's :class:`~ckptguard.train.backends.Backend` for all of the above
* ``sizing``     adapter and checkpoint bytes from a model config dict
* ``synthetic``  a seeded toy data set whose audio codes are a function of the text (demo, tests)
* ``encode``     wav -> code files with the Higgs audio tokenizer, where the user has it installed

boson-multimodal imports only with transformers 4.46, so this package is imported only when the
backend is chosen; the rest of ckptguard runs on any transformers.
"""
