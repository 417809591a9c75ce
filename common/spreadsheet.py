"""Text for CSV files people open in a spreadsheet."""

# A cell starting with one of these is run as a formula by spreadsheet programs.
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_safe(text: str) -> str:
    """``text`` as a cell a spreadsheet will not run: one that starts like a formula gets an
    apostrophe in front (OWASP's advice on CSV injection). Metric keys, for one, come from
    sites' scripts."""
    return "'" + text if text[:1] in _FORMULA_STARTS else text
