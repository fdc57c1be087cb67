"""A Qwen-style tokenizer built locally, for models whose real tokenizer is not on disk.

The tiny test model and the full-size random-weight benchmark model both need a tokenizer that
`Flux2KleinPipeline` accepts (a `Qwen2TokenizerFast` with the Qwen special tokens and a chat template)
without downloading anything. This one is a byte-level BPE trained in memory on a few sentences: any
text, in any script, tokenizes, because unknown characters fall back to their bytes.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import Qwen2TokenizerFast

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

# The shape of Qwen3's chat template that the pipeline relies on: a user turn, then the assistant
# header. (The pipeline passes enable_thinking=False; this template has no thinking block to skip.)
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_TRAINING_TEXT = [
    "a photo of a cat sitting on a red chair, photorealistic, soft light",
    'a sign that says "hello world" in bold letters',
    "make the sky purple and add a bicycle; change the background to a beach at sunset",
]


def build_local_tokenizer(vocab_size: int = 320) -> Qwen2TokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_TRAINING_TEXT, trainer)
    return Qwen2TokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        bos_token=None,
        chat_template=CHAT_TEMPLATE,
    )
