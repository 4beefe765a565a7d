"""MkDocs hooks of the documentation site: the output tables' column lists come from their one definition.

``<!-- medvlm:output-tables -->`` on a page is replaced by one section per table of
``medvlm_core.output.tables`` (the run tables, the structured tables' leading keys, the eval tables), so the
docs cannot drift from the Arrow and pandera schemas the writers use.
"""

from __future__ import annotations

MARKER = "<!-- medvlm:output-tables -->"


def output_tables_markdown() -> str:
    """The column tables of every output table, as Markdown.

    Returns:
        One ``###`` section per table.
    """
    from medvlm_core.output import tables

    sections = []
    for table in (*tables.RUN_TABLES.values(), *tables.EVAL_TABLES.values()):
        sections.append(f"### `{table.name}`\n\n{table.description}\n\n{table.markdown()}\n")
    keys = tables.structured_table("<extraction table>")
    sections.append("### Structured extraction tables\n\nEvery structured table (`diagnoses`, `medications`, "
                    "`instructions`, a user extraction's table) starts with these columns; the prompt's JSON schema "
                    f"gives the rest.\n\n{keys.markdown()}\n")
    return "\n".join(sections)


def on_page_markdown(markdown, page, config, files):
    """Replace the output tables' marker with their column tables.

    Args:
        markdown: the page's Markdown source.
        page: the MkDocs page.
        config: the MkDocs configuration.
        files: the site's files.

    Returns:
        The Markdown, with the column tables where the marker was.
    """
    if MARKER not in markdown:
        return markdown
    return markdown.replace(MARKER, output_tables_markdown())
