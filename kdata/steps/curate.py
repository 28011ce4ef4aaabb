"""Data curation from meta-information: `curate` makes instructions from topics or documents.

From topics: the teacher expands the recipe's topics into a tree of subtopics (``breadth``
children per node, ``depth`` levels), then writes questions or tasks for each leaf. From
documents: text or markdown files (paths or globs) or a column of the rows in are cut into
overlapping chunks, and the teacher writes question-answer pairs grounded in each chunk, each
with a quote that must appear in the chunk.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, Literal

from jinja2 import TemplateError
from pydantic import Field, model_validator

from kdata import prompts
from kdata.blocks import batched
from kdata.errors import KdataError, TeacherError
from kdata.steps.base import (
    PROVENANCE,
    ParseError,
    StepBase,
    StepContext,
    StepOutput,
    TeacherRef,
    Template,
    dropped,
    failure,
    gather_requests,
    provenance,
    rid,
    row_id,
    teacher_names,
)
from kdata.steps.replies import labelled_fields, numbered_list, render

_QUOTE_MARKS = "\"'“”‘’«» \t\n"
_QA_LABELS = ("Question", "Answer", "Quote")


class CurateStep(StepBase):
    """Synthesize instructions from topics or documents.

    Exactly one source: ``topics``, ``documents`` (files or globs, relative to the recipe) or
    ``document_column`` (a column of the rows in).

    Topics: each level of the tree costs one request per node (``subtopics_prompt``, a numbered
    list; the first ``breadth`` distinct items are its children), and each leaf one more
    (``topic_prompt``) for ``per_prompt`` questions or tasks. Rows out: ``instruction``, ``topic``
    and ``topic_path`` (root to leaf).

    Documents: each chunk of ``chunk_chars`` characters (cut at a paragraph, line or word break
    in its second half; consecutive chunks share ``overlap_chars``) costs one request
    (``document_prompt``) for ``per_prompt`` pairs, each ``Question:`` / ``Answer:`` / ``Quote:``.
    Rows out: ``instruction`` (the question), ``response`` (the answer), ``quote`` (the quoted
    text as it stands in the source), ``source`` (the file relative to the recipe, or the row id),
    ``chunk``, ``chunk_start`` / ``chunk_end`` and ``quote_start`` / ``quote_end`` (character
    offsets in the source). A pair whose quote is not in its chunk (compared without regard to
    case, whitespace or surrounding quotation marks) is dropped with reason
    ``quote_not_in_chunk``.

    Topics and files are sources: the rows in pass through, and the new rows follow them. With
    ``document_column`` each row in is a document: its chunks' pairs replace it, keeping its
    other columns. Units of work: the rows passed through, every item the teacher proposed, every
    failed request (a failed subtopic request loses its subtree), and every row in without text
    in ``document_column``. Items past ``per_prompt`` in a reply are dropped (``over_count``).

    Over blocks: with ``document_column`` a map step (each row's pairs follow the order of the
    rows, and of each row's chunks). With topics or files a source step: the topic tree (its
    paths only) is grown first and its failed requests written, then the leaves, or the files'
    chunks (a file read when its chunks' turn comes), ``block_rows // per_prompt`` (at least
    one) a block, so that a block keeps at most ``block_rows`` rows.
    """

    type: Literal["curate"] = "curate"
    teacher: TeacherRef
    topics: list[str] | None = Field(default=None, min_length=1)
    depth: int = Field(default=0, ge=0)
    breadth: int = Field(default=3, ge=1)
    documents: list[str] | None = Field(default=None, min_length=1)
    document_column: str | None = None
    chunk_chars: int = Field(default=2000, ge=100)
    overlap_chars: int = Field(default=200, ge=0)
    per_prompt: int = Field(default=3, ge=1)
    subtopics_prompt: Template = prompts.load("curate.subtopics")
    topic_prompt: Template = prompts.load("curate.topic")
    document_prompt: Template = prompts.load("curate.document")

    @model_validator(mode="after")
    def _one_source(self) -> CurateStep:
        given = [f for f in ("topics", "documents", "document_column") if getattr(self, f)]
        if len(given) != 1:
            raise ValueError(
                "curate needs exactly one source: topics, documents or document_column"
                + (f" (got {', '.join(given)})" if given else "")
            )
        topic_only = {"depth", "breadth", "subtopics_prompt", "topic_prompt"}
        doc_only = {"chunk_chars", "overlap_chars", "document_prompt"}
        misplaced = (topic_only if self.topics is None else doc_only) & self.model_fields_set
        if misplaced:
            raise ValueError(f"{', '.join(sorted(misplaced))} do not apply to this source")
        if self.topics is not None and len(set(self.topics)) != len(self.topics):
            raise ValueError("a topic is listed twice")
        if self.overlap_chars >= self.chunk_chars // 2:
            raise ValueError("overlap_chars must be under half of chunk_chars")
        return self

    def teacher_names(self) -> set[str]:
        return teacher_names(self.teacher)

    def files(self, base_dir: Path) -> list[Path]:
        """The document files, in a stable order, each once.

        Raises:
            KdataError: a path or glob matches no file.
        """
        found: dict[Path, None] = {}
        for pattern in self.documents or []:
            p = Path(pattern).expanduser()
            if p.is_absolute():
                matches = sorted(Path(p.anchor).glob(str(p.relative_to(p.anchor))))
            else:
                matches = sorted(base_dir.glob(pattern))
            matches = [m for m in matches if m.is_file()]
            if not matches:
                where = base_dir.resolve()
                raise KdataError(f"curate: documents '{pattern}' matches no file (in {where})")
            found.update(dict.fromkeys(matches))
        return list(found)

    def inputs_digest(self, base_dir: Path) -> str:
        if not self.documents:
            return ""
        h = hashlib.sha256()
        for f in self.files(base_dir):
            h.update(str(f).encode() + b"\0" + f.read_bytes())
        return h.hexdigest()

    def plan(self, n_rows: int, base_dir: Path) -> tuple[int, int]:
        """For ``document_column`` the chunks are not known before the rows are: one is assumed."""
        if self.topics is not None:
            inner = sum(len(self.topics) * self.breadth**d for d in range(self.depth))
            leaves = len(self.topics) * self.breadth**self.depth
            return n_rows + leaves * self.per_prompt, inner + leaves
        if self.documents is not None:
            chunks = sum(len(self._spans(_read(f))) for f in self.files(base_dir))
            return n_rows + chunks * self.per_prompt, chunks
        return n_rows * self.per_prompt, n_rows

    def plan_prompt_bytes(self, row_bytes: int) -> int:
        """A chunk (4 bytes a character at most) or a row; topic paths are in the settings."""
        return max(4 * self.chunk_chars, row_bytes)

    @property
    def kind(self) -> str:
        """``map`` over a column of documents; a ``source`` of topics or files."""
        return "map" if self.document_column else "source"

    async def run(self, rows: list[dict], ctx: StepContext) -> StepOutput:
        """``document_column``: each row's pairs, in the order of the rows (and of its chunks)."""
        out = StepOutput(rows=[], expected=0)
        for results in await gather_requests(self._from_row(row, ctx) for row in rows):
            for result in results:
                self._collect(out, result)
        return out

    async def _from_row(self, row: dict, ctx: StepContext) -> list[dict | list[dict]]:
        text = row.get(self.document_column)
        if not (isinstance(text, str) and text.strip()):
            return [failure(row, "missing_column", f"no text in '{self.document_column}'")]
        spans = self._spans(text)
        ctx.set_total(len(spans))
        return await gather_requests(
            self._from_chunk(rid(row), text, span, row, ctx) for span in spans
        )

    async def blocks(self, ctx: StepContext, block_rows: int) -> AsyncIterator[StepOutput]:
        """Topics or files: the new rows, from ``block_rows // per_prompt`` leaves or chunks a
        block (at least one), so that a block keeps at most ``block_rows`` rows. A topic tree's
        failed requests come first."""
        if self.topics is not None:
            leaves, failed = await self._tree(ctx)
            for batch in batched(failed, block_rows):
                yield StepOutput(rows=[], expected=len(batch), failed=batch)
            jobs, make = ((path,) for path in leaves), self._from_leaf
        else:
            jobs, make = self._chunks(ctx), self._from_chunk
        for batch in batched(jobs, max(1, block_rows // self.per_prompt)):
            ctx.set_total(len(batch))
            out = StepOutput(rows=[], expected=0)
            for result in await gather_requests(make(*job, ctx) for job in batch):
                self._collect(out, result)
            yield out

    def _chunks(self, ctx: StepContext) -> Iterator[tuple[str, str, tuple[int, int], None]]:
        """The chunks of the files, one file read at a time."""
        for f in self.files(ctx.base_dir):
            text = _read(f)
            for span in self._spans(text):
                yield _relative(f, ctx.base_dir), text, span, None

    def _spans(self, text: str) -> list[tuple[int, int]]:
        return chunk_spans(text, self.chunk_chars, self.overlap_chars)

    @staticmethod
    def _collect(out: StepOutput, result: dict | list[dict]) -> None:
        """Sort one request's outcome (a failure record, or rows and drop records) into ``out``."""
        for r in result if isinstance(result, list) else [result]:
            out.expected += 1
            out.add(r)

    async def _tree(self, ctx: StepContext) -> tuple[list[list[str]], list[dict]]:
        """The topic tree's leaves (each its path from the root), and its failed requests."""
        level = [[t] for t in self.topics]
        failed = []
        for _ in range(self.depth):
            ctx.set_total(len(level))
            replies = await gather_requests(
                self._ask_list(self.subtopics_prompt, p, self.breadth, ctx) for p in level
            )
            ctx.advance(len(level))
            children = []
            for path, reply in zip(level, replies, strict=True):
                if isinstance(reply, dict):  # a failure: the subtree is lost
                    failed.append(reply)
                    continue
                items, _ = reply
                seen: set[str] = set()
                for item in items:
                    if item.lower() not in seen and len(seen) < self.breadth:
                        seen.add(item.lower())
                        children.append([*path, item])
            level = children
        return level, failed

    async def _from_leaf(self, path: list[str], ctx: StepContext) -> dict | list[dict]:
        """A leaf's questions or tasks (rows and drop records), or a failure record."""
        reply = await self._ask_list(self.topic_prompt, path, self.per_prompt, ctx)
        ctx.advance(1)
        if isinstance(reply, dict):
            return reply
        items, c = reply
        made = []
        for i, item in enumerate(items):
            row = {
                "instruction": item,
                "topic": path[-1],
                "topic_path": path,
                PROVENANCE: provenance(row_id(ctx.name, "q", *path, str(i)), [], ctx.name, c),
            }
            if i >= self.per_prompt:
                row = dropped(row, "over_count", asked=self.per_prompt, got=len(items))
            made.append(row)
        return made

    async def _ask_list(self, template: str, path: list[str], n: int, ctx: StepContext):
        """A numbered list about the topic at ``path``: (items, completion), or a failure record."""
        stub = {"topic_path": path, PROVENANCE: provenance(row_id(ctx.name, *path), [], ctx.name)}
        try:
            content = render(template, {"topic": path[-1], "path": path, "n": n})
        except TemplateError as e:
            return failure(stub, "template", f"prompt template: {e}")
        messages = [{"role": "user", "content": content}]
        try:
            c = await ctx.pool.complete(self.teacher, messages, route_key=rid(stub))
        except TeacherError as e:
            return failure(stub, e.error_class, str(e), attempts=e.attempts)
        try:
            return numbered_list(c.text), c
        except ParseError as e:
            return failure(stub, "parse", str(e), attempts=c.attempts, raw=c.text)

    async def _from_chunk(
        self, source: str, text: str, span: tuple[int, int], parent: dict | None, ctx: StepContext
    ) -> dict | list[dict]:
        """One chunk's pairs (rows and drop records), or a failure record."""
        start, end = span
        chunk = text[start:end]
        base: dict[str, Any] = {}
        if parent is not None:
            base = {k: v for k, v in parent.items() if k not in (self.document_column, PROVENANCE)}
        parents = [rid(parent)] if parent is not None else []
        chunk_id = row_id(ctx.name, source, str(start), str(end))
        stub = {
            **base,
            "source": source,
            "chunk_start": start,
            "chunk_end": end,
            PROVENANCE: provenance(chunk_id, parents, ctx.name),
        }
        try:
            try:
                content = render(
                    self.document_prompt, {"chunk": chunk, "source": source, "n": self.per_prompt}
                )
                c = await ctx.pool.complete(
                    self.teacher, [{"role": "user", "content": content}], route_key=chunk_id
                )
                pairs = parse_pairs(c.text)
            except TemplateError as e:
                return failure(stub, "template", f"prompt template: {e}")
            except TeacherError as e:
                return failure(stub, e.error_class, str(e), attempts=e.attempts)
            except ParseError as e:
                return failure(stub, "parse", str(e), attempts=c.attempts, raw=c.text)
        finally:
            ctx.advance(1)
        made = []
        for i, (question, answer, quote) in enumerate(pairs):
            row = {
                **base,
                "instruction": question,
                "response": answer,
                "quote": quote,
                "source": source,
                "chunk": chunk,
                "chunk_start": start,
                "chunk_end": end,
                PROVENANCE: provenance(row_id(chunk_id, str(i)), parents, ctx.name, c),
            }
            where = locate(quote, chunk)
            if i >= self.per_prompt:
                made.append(dropped(row, "over_count", asked=self.per_prompt, got=len(pairs)))
            elif where is None:
                made.append(dropped(row, "quote_not_in_chunk", quote=quote))
            else:
                row["quote"] = chunk[where[0] : where[1]]
                row["quote_start"], row["quote_end"] = start + where[0], start + where[1]
                made.append(row)
        return made


def chunk_spans(text: str, size: int, overlap: int) -> list[tuple[int, int]]:
    """``(start, end)`` character spans covering ``text``, each at most ``size`` long.

    A chunk ends at the last paragraph break, else line break, else space in its second half
    (at ``size`` when there is none); the next starts ``overlap`` characters before that end,
    moved forward to the start of a word. Blank chunks are left out.
    """
    spans = []
    start, n = 0, len(text)
    while start < n:
        end = min(start + size, n)
        if end < n:
            for sep in ("\n\n", "\n", " "):
                cut = text.rfind(sep, start + size // 2, end)
                if cut != -1:
                    end = cut + len(sep)
                    break
        if text[start:end].strip():
            spans.append((start, end))
        if end >= n:
            break
        nxt = max(end - overlap, start + 1)
        if nxt < end and not text[nxt - 1].isspace():
            space = re.search(r"\s", text[nxt:end])
            nxt = nxt + space.end() if space else end
        start = nxt
    return spans


def locate(quote: str, chunk: str) -> tuple[int, int] | None:
    """Where ``quote`` stands in ``chunk``: case, whitespace and outer quotation marks aside."""
    tokens = quote.strip(_QUOTE_MARKS).rstrip(".").split()
    if not tokens:
        return None
    m = re.search(r"\s+".join(re.escape(t) for t in tokens), chunk, re.IGNORECASE)
    return m.span() if m else None


def parse_pairs(text: str | None) -> list[tuple[str, str, str]]:
    """``(question, answer, quote)`` triples from ``Question:`` / ``Answer:`` / ``Quote:`` fields.

    Raises:
        ParseError: no pair, a field out of order, an empty field or a pair left incomplete.
    """
    pairs: list[list[str]] = []
    for label, value in labelled_fields(text, _QA_LABELS):
        if not value:
            raise ParseError(f"an empty '{label}:' field")
        expected = len(pairs[-1]) % 3 if pairs else 0
        if label == "Question":
            if pairs and len(pairs[-1]) != 3:
                raise ParseError(f"pair {len(pairs)} is incomplete")
            pairs.append([value])
        elif not pairs or _QA_LABELS[expected] != label:
            raise ParseError(f"'{label}:' out of order (expected {_QA_LABELS[expected]}:)")
        else:
            pairs[-1].append(value)
    if not pairs:
        raise ParseError("no 'Question:' / 'Answer:' / 'Quote:' fields in the reply")
    if len(pairs[-1]) != 3:
        raise ParseError(f"pair {len(pairs)} is incomplete")
    return [tuple(p) for p in pairs]


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise KdataError(f"curate: cannot read document {path}: {e}") from None


def _relative(path: Path, base_dir: Path) -> str:
    try:
        return path.resolve().relative_to(base_dir.resolve()).as_posix()
    except ValueError:
        return str(path)
