"""MkDocs hooks: the references are generated from the code at build time (stillroom/reference.py),
so a new config key or CLI flag appears in the docs by itself."""


def on_page_markdown(markdown, page, config, files):
    if "<!-- stillroom: config reference -->" in markdown:
        from stillroom.reference import config_markdown
        markdown = markdown.replace("<!-- stillroom: config reference -->", config_markdown())
    if "<!-- stillroom: cli reference -->" in markdown:
        from stillroom.reference import cli_markdown
        markdown = markdown.replace("<!-- stillroom: cli reference -->", cli_markdown())
    return markdown
