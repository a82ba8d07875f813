"""The parity cases shared by the engine and PD tests."""

PARITY_LENGTHS = [5, 17, 64, 100, 250, 513, 800, 1200]
PARITY_NEW_TOKENS = 8
PARITY_TEXT = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
               "combined movable metal type, oil-based inks and a wooden press adapted from wine making. "
               "Books became cheaper, literacy spread, and ideas travelled faster than ever before. ")
