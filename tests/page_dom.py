"""The `vmhost serve` page read back as data: its node cards, bars (data-* numbers) and VM items."""

from __future__ import annotations

from html.parser import HTMLParser


class PageDom(HTMLParser):
    """The page's cards, bars and VM items as data (what a person sees, from the data-* attributes)."""

    def __init__(self):
        super().__init__()
        self.node: str | None = None
        self.cards: list[str] = []  # NUMA node ids, one card each, in page order
        self.bars: dict[tuple[str | None, str], dict[str, str]] = {}
        self.vms: dict[str, str | None] = {}
        self.foreign: list[str] = []
        self._vm: str | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "section":
            self.node = a.get("data-node")
            if self.node is not None:
                self.cards.append(self.node)
        if "data-kind" in a:
            self.bars[(self.node, a["data-kind"])] = a
        if "data-vm" in a:
            self._vm = a["data-vm"]
            self.vms[a["data-vm"]] = self.node
        if tag == "span" and a.get("class") == "foreign":
            self.foreign.append(self._vm)
