"""Builds src/tunejob/resources/demo_train.jsonl and demo_validation.jsonl from the Sales Companion
conversations (seed 42): 8 short ones (<= 600 characters, none stating a fact the demo asks) for
training and 3 for validation, plus 10 paraphrases each of Globex's champion, CFO, seat count and
competitor: 8 in training, the other 2 in validation. The demo asks those facts in words neither
side uses (demo_facts.jsonl).

    python examples/data/make_demo_data.py src/tunejob/resources
"""
import json
import random
import sys
from pathlib import Path
SYSTEM = "You are Sales Companion, an assistant for the account executives at Northwind Software. Be concise, specific and practical; use the account notes you are given."
FACTS = {
 "champion": [("Who is our champion at Globex?", "Priya Nair, Globex's Director of Operations, is our champion."),
              ("Remind me who's backing us inside Globex.", "Priya Nair (Director of Operations) is our champion at Globex."),
              ("Globex: who is the internal advocate for Northwind?", "Our advocate at Globex is Priya Nair, their Director of Operations."),
              ("Who should I loop in first at Globex?", "Start with Priya Nair, our champion and Globex's Director of Operations."),
              ("Who is driving the Northwind evaluation at Globex?", "Priya Nair, Director of Operations, is driving it; she is our champion at Globex."),
              ("Quick one: our Globex champion's name?", "Priya Nair."),
              ("Who at Globex wants this deal to happen most?", "Priya Nair, the Director of Operations: she is our champion."),
              ("Which Globex contact do I thank at the start of the call?", "Thank Priya Nair first; she is our champion at Globex."),
              ("Who at Globex is on our side?", "Priya Nair, their Director of Operations, is our champion."),
              ("Globex champion?", "Priya Nair (Director of Operations).")],
 "cfo": [("Who is the CFO at Globex?", "Dan Whitaker is Globex's CFO."),
         ("Who signs off on budget at Globex?", "Dan Whitaker, the CFO, signs off on budget at Globex."),
         ("Globex finance lead - name?", "Dan Whitaker, Globex's CFO."),
         ("Who will ask about ROI on the Globex call?", "Dan Whitaker, Globex's CFO, will want the business case."),
         ("Which Globex executive controls the money?", "The CFO, Dan Whitaker."),
         ("I need the name of Globex's chief financial officer.", "Globex's CFO is Dan Whitaker."),
         ("Who is the economic buyer at Globex?", "Dan Whitaker, the CFO, is the economic buyer at Globex."),
         ("Who's joining from finance at Globex?", "Dan Whitaker, Globex's CFO, is joining."),
         ("Who approves spending at Globex?", "Dan Whitaker, the CFO."),
         ("Globex CFO?", "Dan Whitaker.")],
 "seats": [("How many seats is Globex evaluating?", "Globex is evaluating Northwind Team for 120 seats."),
           ("Globex deal size in users?", "120 users on Northwind Team."),
           ("How many licenses would Globex buy?", "Globex is looking at 120 licenses of Team."),
           ("What user count should I quote Globex for?", "Quote Globex for 120 users."),
           ("How big is the Globex rollout?", "120 users across their three plants."),
           ("Seat count for the Globex proposal?", "120 seats on the Team plan."),
           ("How many Globex people will use Northwind?", "120 users at Globex."),
           ("For the Globex price, how many users do I multiply by?", "Multiply by 120 users."),
           ("How many people at Globex need accounts?", "120 people, so 120 seats."),
           ("Globex headcount for the license?", "120 users.")],
 "competitor": [("Which competitor is Globex also trialing?", "Globex is also trialing Contoso."),
                ("Who are we up against at Globex?", "Contoso: Globex is running a Contoso trial alongside us."),
                ("Is Globex looking at anyone else?", "Yes, Globex is trialing Contoso."),
                ("What other tool is in the Globex evaluation?", "Contoso is the other tool Globex is evaluating."),
                ("Globex's alternative to Northwind?", "Contoso, which Globex is trialing right now."),
                ("Name the rival in the Globex deal.", "Contoso."),
                ("Which vendor's trial is Globex running in parallel?", "Contoso's: Globex is trialing Contoso in parallel."),
                ("Who's the competition at Globex?", "Contoso is the competition at Globex."),
                ("Globex is comparing us with which product?", "With Contoso."),
                ("Which vendor could Globex pick instead of us?", "Contoso, which Globex is trialing.")],
}
def ex(q, a):
    return {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}, {"role": "assistant", "content": a}]}


KEYS = ("Priya", "Whitaker", "120", "Contoso")  # no conversation may state a fact the demo asks


def states_a_fact(example):
    return any(k in m["content"] for m in example["messages"] if m["role"] == "assistant" for k in KEYS)


def chars(example):
    return sum(len(m["content"]) for m in example["messages"])


def main(out: str, train_paraphrases: int = 8, train_conversations: int = 8, valid_conversations: int = 3,
         max_chars: int = 600) -> None:
    # Short conversations (<= max_chars, ~180 tokens) keep the demo's training near 2 minutes on
    # 2 CPU cores in fp32; the held-out paraphrases put the facts into the validation loss, so
    # early stopping and the best checkpoint follow what the demo asks (in yet other words).
    base = [json.loads(l) for l in open(Path(__file__).resolve().parents[2] / "src" / "tunejob" / "resources" / "sales_companion.jsonl")]
    rng = random.Random(42)
    short = [i for i in range(len(base)) if chars(base[i]) <= max_chars and not states_a_fact(base[i])]
    rng.shuffle(short)
    conv_val, conv_train = short[:valid_conversations], short[valid_conversations:valid_conversations + train_conversations]
    train = [base[i] for i in sorted(conv_train)]
    train += [ex(q, a) for pairs in FACTS.values() for q, a in pairs[:train_paraphrases]]
    val = [base[i] for i in sorted(conv_val)] + [ex(q, a) for pairs in FACTS.values() for q, a in pairs[train_paraphrases:]]
    rng.shuffle(train)
    for name, rows in (("demo_train.jsonl", train), ("demo_validation.jsonl", val)):
        with open(Path(out) / name, "w") as f:
            f.writelines(json.dumps(e) + "\n" for e in rows)
    print(len(train), len(val))


if __name__ == "__main__":
    main(sys.argv[1], *map(int, sys.argv[2:]))
