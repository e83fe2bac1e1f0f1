"""Knowledge elicitation: get training data out of a teacher (``distillery generate``, see
:func:`distillery.elicit.run.run_generate`)."""
