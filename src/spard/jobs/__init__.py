"""The jobs (recipes, in torchtune's sense): the alignment stage and the fine-tuning job. They call the
library (:func:`spard.trainer.fit`, data, defenses); nothing in the library imports them."""
