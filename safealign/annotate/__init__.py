"""Annotation of generated samples into ADPO triples (x, y_w, y_l, y_t) (docs/methods.md A.2 steps 4-5).

- :mod:`.rows`: the generation-row schema, grouping by prompt, and the triples files on disk;
- :mod:`.select`: the drop reasons, their tally, and the pure choice of (y_w, y_l, y_t);
- :mod:`.classifier`: :class:`~.classifier.ClassifierJudge` over scorers (``judge=classifier``);
- :mod:`.llm`: the one LLM-judge prompt, the one reply parser, :class:`~.llm.LLMJudge`;
- :mod:`.hf`: a greedy ``generate_fn`` over a local HF model for the LLM judge.

Nothing is re-exported here: users import the submodule they need, so that importing the parser
(``safealign.eval.scorers`` does) never pulls in the classifier judge or transformers.
"""
