"""A byte-level BPE tokenizer trained locally, for checkpoints the project writes itself.

Nothing is downloaded: the training corpus is generated here from an embedded word list,
digits, punctuation, code and some non-ASCII text. The tokenizer is byte-level, so any
Unicode string round-trips ``decode(encode(text)) == text``; characters rarely seen in the
corpus (emoji, most CJK) are split into byte tokens, which is what incremental
detokenization has to cope with on real models too.

Each architecture gets its family's special tokens, BOS behaviour and chat format:
Llama 3 (``<|begin_of_text|>``, BOS prepended), ChatML for Qwen (no BOS) and ``[INST]``
for Mistral (``<s>`` prepended). Special tokens come after the BPE vocabulary, as in
Llama 3 and Qwen.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

# Llama 3's pre-tokenizer split: contractions, words, 1-3 digit groups, punctuation runs, spaces.
_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# With ``tools`` each template renders them, and assistant tool calls and tool results, in its
# family's manner (Llama 3.1: JSON calls and an ipython role; Qwen: Hermes <tool_call> tags;
# Mistral: [AVAILABLE_TOOLS] / [TOOL_CALLS] / [TOOL_RESULTS]); without, the output is as before.
# A call's arguments arrive as OpenAI's JSON string, or as an object.
_ARGUMENTS = "{% set args = call['function']['arguments'] %}{{ args if args is string else args | tojson }}"

_LLAMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{% if tools %}{{ '<|start_header_id|>system<|end_header_id|>\n\nEnvironment: ipython\n"
    "These functions can be called; to call one, answer with only "
    "{\"name\": <function name>, \"parameters\": <arguments object>}.\n\n' }}"
    "{% for tool in tools %}{{ tool | tojson }}{{ '\n' }}{% endfor %}{{ '<|eot_id|>' }}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' and message.tool_calls %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% for call in message.tool_calls %}{% if not loop.first %}{{ '; ' }}{% endif %}"
    "{{ '{\"name\": \"' + call['function']['name'] + '\", \"parameters\": ' }}" + _ARGUMENTS + "{{ '}' }}{% endfor %}"
    "{{ '<|eot_id|>' }}"
    "{% elif message['role'] == 'tool' %}"
    "{{ '<|start_header_id|>ipython<|end_header_id|>\n\n' }}{{ message['content'] | trim }}{{ '<|eot_id|>' }}"
    "{% else %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{{ message['content'] | trim }}{{ '<|eot_id|>' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

_CHATML_TEMPLATE = (
    "{% if tools %}{{ '<|im_start|>system\n' }}"
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\n\n' }}{% endif %}"
    "{{ '# Tools\n\nFunctions you may call, one JSON signature a line:\n<tools>\n' }}"
    "{% for tool in tools %}{{ tool | tojson }}{{ '\n' }}{% endfor %}"
    "{{ '</tools>\n\nTo call a function, answer with <tool_call>\n{\"name\": <function name>, \"arguments\": "
    "<arguments object>}\n</tool_call>, once per call.<|im_end|>\n' }}{% endif %}"
    "{% for message in messages %}"
    "{% if tools and loop.first and message['role'] == 'system' %}"
    "{% elif message['role'] == 'assistant' and message.tool_calls %}"
    "{{ '<|im_start|>assistant\n' }}{% if message['content'] %}{{ message['content'] + '\n' }}{% endif %}"
    "{% for call in message.tool_calls %}{% if not loop.first %}{{ '\n' }}{% endif %}"
    "{{ '<tool_call>\n{\"name\": \"' + call['function']['name'] + '\", \"arguments\": ' }}" + _ARGUMENTS + "{{ '}\n</tool_call>' }}"
    "{% endfor %}{{ '<|im_end|>\n' }}"
    "{% elif message['role'] == 'tool' %}"
    "{{ '<|im_start|>user\n<tool_response>\n' + message['content'] + '\n</tool_response><|im_end|>\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Mistral has no system role: a system message is prepended to the next user turn. The
# prompt already ends at [/INST] where the assistant answers, so add_generation_prompt
# adds nothing. The tools come just before the last user turn.
_MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% set system = namespace(text='', last_user=-1) %}"
    "{% for message in messages %}{% if message['role'] == 'user' %}{% set system.last_user = loop.index0 %}{% endif %}{% endfor %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% set system.text = message['content'] + '\n\n' %}"
    "{% elif message['role'] == 'user' %}"
    "{% if tools and loop.index0 == system.last_user %}{{ '[AVAILABLE_TOOLS] ' }}{{ tools | tojson }}{{ '[/AVAILABLE_TOOLS]' }}{% endif %}"
    "{{ '[INST] ' + system.text + message['content'] + ' [/INST]' }}{% set system.text = '' %}"
    "{% elif message['role'] == 'tool' %}{{ '[TOOL_RESULTS] ' + message['content'] + '[/TOOL_RESULTS]' }}"
    "{% elif message.tool_calls %}{{ ' [TOOL_CALLS] [' }}"
    "{% for call in message.tool_calls %}{% if not loop.first %}{{ ', ' }}{% endif %}"
    "{{ '{\"name\": \"' + call['function']['name'] + '\", \"arguments\": ' }}" + _ARGUMENTS + "{{ '}' }}{% endfor %}"
    "{{ ']' + eos_token }}"
    "{% else %}{{ ' ' + message['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
)


@dataclass(frozen=True)
class TokenizerStyle:
    """One model family's special tokens and chat format."""

    bos_token: str | None
    eos_token: str
    pad_token: str | None
    end_of_turn_token: str  # ends an assistant turn; generation stops on it as on eos
    special_tokens: tuple[str, ...]  # all of them, in id order after the BPE vocabulary
    add_bos_token: bool
    chat_template: str


_LLAMA3 = TokenizerStyle(
    bos_token="<|begin_of_text|>",
    eos_token="<|end_of_text|>",
    pad_token=None,
    end_of_turn_token="<|eot_id|>",
    special_tokens=(
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eot_id|>",
    ),
    add_bos_token=True,
    chat_template=_LLAMA3_TEMPLATE,
)
_CHATML = TokenizerStyle(
    bos_token=None,
    eos_token="<|endoftext|>",
    pad_token="<|endoftext|>",
    end_of_turn_token="<|im_end|>",
    special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
    add_bos_token=False,
    chat_template=_CHATML_TEMPLATE,
)
_MISTRAL = TokenizerStyle(
    bos_token="<s>",
    eos_token="</s>",
    pad_token=None,
    end_of_turn_token="</s>",
    special_tokens=("<s>", "</s>", "[INST]", "[/INST]"),
    add_bos_token=True,
    chat_template=_MISTRAL_TEMPLATE,
)
TOKENIZER_STYLES: dict[str, TokenizerStyle] = {
    "llama": _LLAMA3,
    "qwen2": _CHATML,
    "qwen3": _CHATML,
    "mistral": _MISTRAL,
}

_WORDS = (
    "the of and to in is was that for on with as it by at from be this are have not or an "
    "which but they one all were we when there can more has their if will would who so what "
    "up out about into than them some time only new other could these two may first then "
    "any like my now over such our man me even most made after also did many before must "
    "through back years where much your way well down should because each just those people "
    "how too little state good very make world still own see men work long get here between "
    "both life being under never day same another know while last might us great old year "
    "off come since against go came right used take three model token cache block request "
    "prefill decode server worker batch tensor layer attention memory transfer latency "
    "throughput queue stream router kernel sequence prompt weight matrix vector parallel "
    "river mountain coffee window garden music paper light water city north ocean silver"
).split()
_SYLLABLES = (
    "ka ri to ma ne lo su vi an el or im us be da fe go hu ja ke li mo nu pa qu ra se ti "
    "vo wa xe yo ze ston ber land mar ford ley shi ton rin dor"
).split()
_PUNCTUATION = (".", ",", "!", "?", ";", ":", " -", "...")
_EXTRA_LINES = (
    "héllo wörld, ça va? naïve café déjà vu",
    "日本語のテキストと中文文本",
    "Привет, мир! Как дела?",
    "Γειά σου κόσμε",
    "emoji 🙂 🚀 ✓ — “quotes” and ‘apostrophes’",
    "def forward(self, x):\n    return self.proj(x) + 1\n",
    "for (int i = 0; i < n; ++i) { sum += a[i] * b[i]; }",
    '{"id": 42, "name": "splitserve", "ok": true}',
    "\t tabs\tand  double  spaces\n\nnew lines\r\n",
)


def _corpus(num_sentences: int = 4000) -> list[str]:
    # A private Random so the corpus, and with it the tokenizer, never depends on outside state.
    rng = random.Random(0)
    lines = []
    for _ in range(num_sentences):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 14))]
        if rng.random() < 0.5:  # made-up names give BPE more to merge than the word list alone
            name = "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 3)))
            words.insert(rng.randrange(len(words)), name.capitalize())
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words)), str(rng.randint(0, 10**rng.randint(1, 7))))
        sentence = " ".join(words)
        lines.append(sentence[0].upper() + sentence[1:] + rng.choice(_PUNCTUATION))
    lines.extend(_EXTRA_LINES * 20)
    return lines


# Past this many BPE tokens the vocabulary is constructed rather than trained (see
# _extend_with_words): the corpus would have to be far larger to give 150k merges.
MAX_TRAINED_BPE = 4096
_CONSONANTS = ("", "b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "y", "z",
               "ch", "sh", "st", "th", "tr")
_VOWELS = ("a", "e", "i", "o", "u", "ea", "ou")
_CODAS = ("", "", "", "", "n", "r", "s", "t", "l", "ng")


def _words(rng: random.Random):
    """Endless made-up words of 1-3 syllables, as byte-level strings: about half with a
    leading space ("Ġ"), some capitalized, as in a real vocabulary."""
    syllables = [c + v + e for c in _CONSONANTS for v in _VOWELS for e in _CODAS]
    while True:
        word = "".join(rng.choices(syllables, k=rng.choices((1, 2, 3), weights=(4, 5, 1))[0]))
        if rng.random() < 0.2:
            word = word.capitalize()
        yield "Ġ" + word if rng.random() < 0.55 else word


def _bpe_pieces(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """The pieces BPE leaves ``word`` in: the lowest-ranked merge first, until none applies."""
    pieces = list(word)
    while len(pieces) > 1:
        best, at = None, 0
        for i in range(len(pieces) - 1):
            rank = ranks.get((pieces[i], pieces[i + 1]))
            if rank is not None and (best is None or rank < best):
                best, at = rank, i
        if best is None:
            break
        pieces[at : at + 2] = [pieces[at] + pieces[at + 1]]
    return pieces


def _extend_with_words(backend: Tokenizer, num_bpe: int) -> None:
    """Grows a trained BPE to ``num_bpe`` tokens with made-up words.

    Each word gets merges that join the pieces BPE leaves it in, left to right, ranked after
    every merge before them, so encoding the word gives its token. Real-shape checkpoints need
    this: a random model samples ids all over its output layer, and with a small tokenizer
    under a 150k-row layer almost none of them decode to text, which hides the detokenizing
    and streaming work a real model causes.
    """
    state = json.loads(backend.to_str())
    vocab: dict[str, int] = state["model"]["vocab"]
    ranks = {tuple(m): rank for rank, m in enumerate(state["model"]["merges"])}
    for word in _words(random.Random(1)):
        if word in vocab:
            continue
        pieces = _bpe_pieces(word, ranks)
        so_far = pieces[0]
        for piece in pieces[1:]:
            if len(vocab) == num_bpe:
                backend.model = models.BPE(vocab=vocab, merges=list(ranks))
                return
            ranks[so_far, piece] = len(ranks)
            so_far += piece
            vocab.setdefault(so_far, len(vocab))  # an existing token may be reached by a new merge


def special_token_id(arch: str, token: str, vocab_size: int) -> int:
    """The id ``build_tokenizer(vocab_size, arch=arch)`` gives a special token, without building it."""
    special_tokens = TOKENIZER_STYLES[arch].special_tokens
    return vocab_size - len(special_tokens) + special_tokens.index(token)


def build_tokenizer(vocab_size: int = 1024, *, arch: str = "llama") -> PreTrainedTokenizerFast:
    """Trains a byte-level BPE with exactly ``vocab_size`` tokens, special tokens included.

    Deterministic: the same arguments give an identical tokenizer.json.
    """
    try:
        style = TOKENIZER_STYLES[arch]
    except KeyError:
        raise ValueError(f"arch {arch!r} is not one of {sorted(TOKENIZER_STYLES)}") from None
    num_bpe = vocab_size - len(style.special_tokens)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if num_bpe < len(alphabet):
        raise ValueError(
            f"vocab_size {vocab_size} is too small: need at least "
            f"{len(alphabet) + len(style.special_tokens)} (256 bytes + special tokens)"
        )

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    # The 256-byte initial alphabet is what makes every string encodable.
    trainer = trainers.BpeTrainer(
        vocab_size=min(num_bpe, MAX_TRAINED_BPE), initial_alphabet=alphabet, show_progress=False
    )
    backend.train_from_iterator(_corpus(), trainer=trainer)
    if num_bpe > MAX_TRAINED_BPE:
        _extend_with_words(backend, num_bpe)
    if backend.get_vocab_size() != num_bpe:  # the corpus or the word generator fell short: a bug here
        raise RuntimeError(f"built {backend.get_vocab_size()} BPE tokens, not {num_bpe}")
    # Added after training so that they take the ids right after the BPE vocabulary.
    backend.add_special_tokens(list(style.special_tokens))

    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=style.bos_token,
        eos_token=style.eos_token,
        pad_token=style.pad_token,
        add_bos_token=style.add_bos_token,  # builds the post-processor that prepends BOS
        add_eos_token=False,
        chat_template=style.chat_template,
        # Exact round-trips: no "hello ." -> "hello." clean-up on decode.
        clean_up_tokenization_spaces=False,
        model_max_length=1 << 20,
    )


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, out_dir: str | Path) -> None:
    """Writes tokenizer.json, tokenizer_config.json and chat_template.jinja."""
    tokenizer.save_pretrained(str(out_dir))
    # transformers 5 writes the template to chat_template.jinja and names its own class;
    # readers of tokenizer_config.json alone (transformers 4, other servers) need the
    # template inline and a class name every release knows.
    config_path = Path(out_dir) / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config["chat_template"] = tokenizer.chat_template
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
