"""``difflab app``: the lab in a browser, a local Gradio page with one tab per idea (issue 27).

Each tab is one module that holds the tab's work as plain functions (numbers and pictures in, numbers and
pictures out, :class:`~difflab.errors.DifflabError` for bad input) and a ``build()`` that lays the tab out
with Gradio and wires its buttons to those functions. :mod:`difflab.app.page` puts the tabs together;
:mod:`difflab.app.cli` starts the server. Gradio is imported only inside ``build()`` and the page, so the
functions behind the tabs import and test without it.

=============  ===================================================================================
tab            module
=============  ===================================================================================
World          :mod:`difflab.app.world_tab`: scenes of a preset and seed, their fields, the reader
Schedules      :mod:`difflab.app.schedules_tab`: alpha-bar, log-SNR and beta side by side, explained
Generate       :mod:`difflab.app.generate_tab`: a run, a prompt -> images, verdicts, the trajectory
Train          :mod:`difflab.app.train_tab`: a run's loss curve and latest grid, live; tiny trainings
=============  ===================================================================================

A new tab (Edit, Control, Ask, Depth) is a new ``*_tab.py`` with a ``build(page, runs)``, named in
:data:`difflab.app.page.TABS`.
"""
