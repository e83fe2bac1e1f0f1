"""Knowledge elicitation: get training data out of a teacher."""

from distillery.elicit.labeling import label_problems

__all__ = ["label_problems"]
