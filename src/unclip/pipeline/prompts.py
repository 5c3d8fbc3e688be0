"""How a pipeline reads prompts, and what it warns about them.

A shapes-world model reads a prompt in the form of the world's captions; every model warns about
words it never learnt, and a shapes-world model about relations its captions never say that way.
`PromptReading` holds these `UnclipPipeline` methods.
"""

from __future__ import annotations

from pathlib import Path

from unclip.config import UnclipConfig
from unclip.tokenizer import clean_text, has_thai

IMPORTED = "imported:"  # the config name's prefix for models read from diffusers' layout (interop.py)
EXAMPLE_PROMPT = "a red circle above a blue square"  # what a shapes-world model is shown off with


def reads_world_captions(config: UnclipConfig) -> bool:
    """Whether a model reads prompts in the form of shapes world's captions (`vocabulary.caption_form`):
    one trained on shapes world, not one imported from diffusers' layout."""
    return config.data.source == "shapes" and not config.name.startswith(IMPORTED)


class PromptReading:
    """The prompt reading and warnings of `UnclipPipeline` (a mixin of it)."""

    def read_form(self, prompt: str) -> str:
        """`prompt` as this model reads it: `clean_text` (invisible characters, whitespace runs, Thai
        typing variants), and for a shapes-world model the form of the world's captions
        (`vocabulary.caption_form`: lower case, Thai words without spaces between them)."""
        if not reads_world_captions(self.config):
            return clean_text(prompt)
        from unclip.data.vocabulary import caption_form

        return caption_form(prompt)

    @property
    def example_prompt(self) -> str:
        """A prompt like the model's training captions, for the tools to suggest: the README's for
        shapes world, else the first caption its CLIP was trained on ("" when its manifest has none)."""
        if self.config.data.source == "shapes":
            return EXAMPLE_PROMPT
        if self.directory is None:
            return ""
        from unclip.modeldir import read_manifest

        return (read_manifest(self.directory).stats.get("example_captions") or [""])[0]

    def prompt_warnings(self, prompt: str) -> list[str]:
        """What a caller should know about `prompt` before trusting the images: words the model never
        saw, and whether it is longer than the model reads. Said in Thai for a prompt in Thai."""
        warnings = self._word_warnings(prompt)
        if self.clip.tokenize([self.read_form(prompt)]).truncated[0]:
            reads = self.clip.tokenizer.context_length - 2
            warnings.append(f"ข้อความนี้ยาวเกิน {reads} โทเคนที่โมเดลนี้อ่านได้ ส่วนที่เกินถูกตัดทิ้ง" if has_thai(prompt) else
                            f"it is longer than the {reads} tokens this model reads; the rest was left out")
        return warnings

    def _word_warnings(self, prompt: str) -> list[str]:
        """Words the model never learnt: for a shapes-world model, words of no caption of the world
        (docs/shapes_world.md) and known words put together as no caption puts them between two shapes
        (`_relation_warnings`); for one trained on other data, words of none of the captions its
        tokenizer learnt from (`unclip.words`; none for a model saved without them). In Thai for a
        prompt in Thai."""
        world = reads_world_captions(self.config)
        if world and not any(ch.isalnum() for ch in prompt):
            return ["it has no words, only symbols or emoji, so it tells the model nothing it learnt: expect "
                    "whatever the model draws for an empty caption"]
        relations = self._relation_warnings(prompt) if world else []
        unknown = self.unknown_words(prompt)
        if not unknown:
            return relations
        from unclip.words import did_you_mean

        words, one, thai = ", ".join(map(repr, unknown)), len(unknown) == 1, has_thai(prompt)
        if world:
            from unclip.data.vocabulary import vocabulary

            known = vocabulary()
            said = (f"โมเดลนี้ไม่เคยเห็นคำว่า {words} ตอนฝึก {'คำนี้' if one else 'คำเหล่านี้'}จึงไม่มีความหมายสำหรับโมเดล"
                    if thai else f"this model never saw {words} in training; "
                                 f"{'that word means' if one else 'those words mean'} nothing to it")
        else:
            known, read = self.clip.tokenizer.words.words, self.clip.tokenizer.words.captions
            said = (f"คำว่า {words} ไม่อยู่ในคำบรรยาย {read:,} รายการที่โมเดลนี้เรียนคำศัพท์มา "
                    f"{'คำนี้' if one else 'คำเหล่านี้'}จึงแทบไม่มีความหมายสำหรับโมเดล"
                    if thai else f"none of the {read:,} training captions this model read its words from uses "
                                 f"{words}; {'that word means' if one else 'those words mean'} little or nothing to it")
        return [said + did_you_mean(unknown, known, thai=thai)] + relations

    def _relation_warnings(self, prompt: str) -> list[str]:
        """For a shapes-world model: a phrase placing one shape by another that no caption of the world
        uses, though each of its words is one ("อยู่บน", is on; "on top of"), with the world's phrases
        for the relation it seems to mean (`vocabulary.unknown_relations`). In Thai for a prompt in Thai."""
        from unclip.data.vocabulary import unknown_relations
        from unclip.data.world import RELATION_EN, RELATION_TH

        thai, warnings = has_thai(prompt), []
        for phrase, relations in unknown_relations(self.read_form(prompt)):
            said = [repr(p) for r in relations for p in (RELATION_TH if thai else RELATION_EN)[r]]
            ours = f"{', '.join(said[:-1])}{' หรือ ' if thai else ' or '}{said[-1]}" if len(said) > 1 else said[0]
            warnings.append(f"คำบรรยายของ shapes world ไม่ใช้ {phrase!r} บอกตำแหน่งของรูปทรงหนึ่งเทียบกับอีกรูปทรง "
                            f"แต่ใช้ {ours} โมเดลจึงอาจวางรูปทรงไม่ตรงกับที่สั่ง" if thai else
                            f"{phrase!r} is not how shapes world's captions say where one shape is from another; "
                            f"they say {ours}, so this model may not place the shapes as asked")
        return warnings

    def _known_words_hint(self, *, thai: bool) -> str:
        """Where the words this model knows are listed, for the log's word warnings: docs/shapes_world.md
        for a shapes-world model, the words.json beside its tokenizer for one trained on other data."""
        if reads_world_captions(self.config):
            where = "docs/shapes_world.md"
        elif self.directory is not None and self.clip.tokenizer.words is not None:
            from unclip.words import WORDS_FILE

            where = str(Path(self.directory) / "tokenizer" / WORDS_FILE)
        else:
            return ""
        return f" (คำที่โมเดลรู้จัก: {where})" if thai else f" (the words it knows: {where})"

    def unknown_words(self, prompt: str) -> list[str]:
        """Words of `prompt` that the model never read in training (each once, in order): for a
        shapes-world model, words of no caption of the world; for one trained on other data, words
        of none of the captions its tokenizer learnt from (not those in scripts written without
        spaces, `unclip.words`); [] for a model saved without its captions' words."""
        if reads_world_captions(self.config):
            from unclip.data.vocabulary import unknown_words

            return unknown_words(self.read_form(prompt))
        words = self.clip.tokenizer.words
        return words.unknown(self.read_form(prompt)) if words is not None else []
