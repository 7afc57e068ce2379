"""Reads Prometheus text format on stdin with the Prometheus project's own
parser (prometheus_client.parser) and prints every sample as JSON:
[{"name", "labels", "value", "type"}]. A malformed exposition fails."""
import json
import sys

from prometheus_client.parser import text_string_to_metric_families

samples = []
for family in text_string_to_metric_families(sys.stdin.read()):
    for s in family.samples:
        samples.append({"family": family.name, "type": family.type,
                        "name": s.name, "labels": s.labels, "value": s.value})
print(json.dumps(samples))
