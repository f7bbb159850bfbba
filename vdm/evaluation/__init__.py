"""Measured quality of generated videos (pure PyTorch, numpy and scikit-learn; no Lightning).

    moving_digits.py  digit and motion accuracy on Moving Digits: the fixed prompt set, caption parsing,
                      a digit classifier fit on the training scans, score(videos, prompts)
    clip_score.py     CLIP score and temporal consistency with an open_clip model, for real datasets

Import the module you need: this package imports neither, so Moving Digits scoring does not load open_clip.
"""
