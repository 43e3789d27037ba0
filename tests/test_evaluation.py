"""kopru.evaluation: each held-out question's record holds the text the model generated, scored as printed."""

from __future__ import annotations

import torch

from kopru.alignment import normalize_text
from kopru.data.encoding import SampleEncoder
from kopru.data.synthetic import shapes_dataset
from kopru.evaluation import answer_results, summarize_answers


def test_each_record_holds_the_greedy_answer_and_is_scored_by_it(build):
    model, processor = build("projection")
    questions = shapes_dataset(3, split="test")[:6]
    records = answer_results(model, SampleEncoder(processor, template="chat"), questions, batch_size=4,
                             max_new_tokens=4)
    assert [r["id"] for r in records] == [q.id for q in questions]
    for question, record in zip(questions, records, strict=True):
        # Independently: the same question alone through the processor and generate.
        prompt = SampleEncoder(processor, template="chat").prompt(question.messages[:1])
        batch = processor([prompt], [question.images], add_special_tokens=False)
        with torch.no_grad():
            alone = processor.batch_decode(model.generate(**batch, max_new_tokens=4))[0].strip()
        assert record["answer"] == alone
        language = question.meta["language"]
        assert record["correct"] == (normalize_text(alone, language) == normalize_text(question.meta["answer"], language))
    assert summarize_answers(records)["all/en"]["n"] == sum(q.meta["language"] == "en" for q in questions)
