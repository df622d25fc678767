"""What only the book needs: chapter setups, figures, explorers, exercise checks, glue and claims.

* ``setups``: the runs, data and sizes the chapters share (full and smoke);
* ``plots``: the figures (``plots.METHOD_COLORS``), one module per concern;
* ``widgets``: interactive explorers of the same data;
* ``checks``: the exercises' self-checks;
* ``recipes``: the book's and the paper's recipe compared (chapter 4b);
* ``prose`` and ``claims``: numbers glued into the text and the claims a full build checks.

It needs the ``[book]`` extra (matplotlib, ipywidgets), which the Colab setup cell installs:
``pip install "retrac-lib[book] @ git+..."``. Import the modules explicitly:
``from retrac_lib.book import plots, setups``.
"""
