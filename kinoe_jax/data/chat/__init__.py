"""Chat data: THE chat template, conversations to token ids with the loss mask, preference pairs,
and the reports their checks produce."""
