"""OpenAI's reinforcement fine-tuning graders, run here: a reward for a model's sample.

    from tunejob.graders import check_grader, grade_many, make_sample
    grader = {"type": "string_check", "name": "city", "input": "{{sample.output_text}}",
              "reference": "{{item.city}}", "operation": "eq"}
    check_grader(grader)                       # GraderError before training, naming each bad key
    results = grade_many(grader, [make_sample("Paris")], [{"city": "Paris"}])
    results[0].score                           # 1.0

The stage sits lowest in the package: the training loop, the CLI (`tunejob grade`) and the server
(/v1/fine_tuning/alpha/graders/run and /validate) call it. Modules, one concept each: template
(the {{item.x}} / {{sample.x}} language), schema (what a grader object must be), string_check,
similarity (text_similarity's metrics), sandbox (python graders' worker processes), model_grader
(score_model, label_model), formula (multi's calculate_output), grade (dispatch), api (the two
endpoints' response shapes), batch (graders over files).
"""

from tunejob.graders.api import run_grader_response, validate_grader_response
from tunejob.graders.context import GraderContext
from tunejob.graders.grade import grade, grade_many
from tunejob.graders.result import GradeResult
from tunejob.graders.schema import GraderError, check_grader, referenced_item_fields
from tunejob.graders.template import make_sample

__all__ = ["GradeResult", "GraderContext", "GraderError", "check_grader", "grade", "grade_many", "make_sample",
           "referenced_item_fields", "run_grader_response", "validate_grader_response"]
