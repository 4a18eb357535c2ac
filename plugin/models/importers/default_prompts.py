"""The zero-shot prompts an imported model gets when the operator gives no ``--prompts`` file.

The findings are the demo model's, so labels, search filters and worklist rules mean the same
for every bundle. The prompts follow CheXzero's positive/negative pairing ("X" vs "no X").
Nothing is escalated to STAT: an imported model is uncalibrated on the site's images until
the operator calibrates it and sets ``priority.stat_if_any`` in a prompts file.
"""

from __future__ import annotations

from plugin.models.bundle import Finding, PromptsFile

_TEMPLATES = ["{}", "chest radiograph showing {}"]

_PROMPTS: dict[str, tuple[str, list[str], list[str]]] = {
    "consolidation": (
        "Consolidation",
        ["consolidation", "airspace consolidation", "pulmonary infiltrate"],
        ["no consolidation", "clear lungs", "no focal airspace opacity"],
    ),
    "pleural_effusion": (
        "Pleural effusion",
        ["pleural effusion", "fluid in the pleural space", "blunted costophrenic angle"],
        ["no pleural effusion", "sharp costophrenic angles", "no pleural fluid"],
    ),
    "cardiomegaly": (
        "Cardiomegaly",
        ["cardiomegaly", "enlarged cardiac silhouette", "enlarged heart"],
        ["no cardiomegaly", "normal heart size", "normal cardiac silhouette"],
    ),
    "pneumothorax": (
        "Pneumothorax",
        ["pneumothorax", "collapsed lung with pleural air", "visible pleural line"],
        ["no pneumothorax", "no pleural air", "fully expanded lungs"],
    ),
    "nodule": (
        "Nodule",
        ["lung nodule", "pulmonary nodule", "nodular opacity"],
        ["no lung nodule", "no pulmonary nodule", "no nodular opacity"],
    ),
    "support_devices": (
        "Support devices",
        ["support devices", "endotracheal tube", "central venous catheter"],
        ["no support devices", "no lines or tubes", "no medical devices"],
    ),
}


def chest_radiograph_prompts() -> PromptsFile:
    """Six chest-radiograph findings with positive and negative prompts, no STAT rules."""
    findings = [
        Finding(
            name=name,
            display=display,
            positive_prompts=positive,
            negative_prompts=negative,
            templates=_TEMPLATES,
        )
        for name, (display, positive, negative) in _PROMPTS.items()
    ]
    # logit_scale is left unset so that the imported model's own value is used.
    return PromptsFile(findings=findings)
