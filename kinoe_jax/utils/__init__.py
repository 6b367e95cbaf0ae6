"""Small shared pieces: atomic writes, the error types tools report in one line, the calm console."""
