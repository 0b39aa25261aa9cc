"""Reports: read result files only (never run a model) and turn them into tables, plots and HTML.

Unit conversions (kWh, gCO2e, per 1,000 images, mJ) happen here and nowhere else.
"""
