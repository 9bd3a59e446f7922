"""The operator dashboard on the Dask scheduler's Bokeh server (`/neuro/...`) and the `neuro_*`
Prometheus series. views.py and feed.py are pure; charts.py and pages.py speak Bokeh."""
